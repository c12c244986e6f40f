"""``--timeout SECONDS``: end a spec that runs too long; it is reported as an error, the others run."""

from __future__ import annotations

import signal
import threading
import time

from sft_spec import hookimpl
from sft_spec.errors import SpecTimeout


@hookimpl
def sft_spec_addoption(parser):
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="end a spec that runs longer than SECONDS (load, training and generation together)")


@hookimpl(wrapper=True)
def sft_spec_run_spec(item, session):
    seconds = session.config.getoption("timeout")
    # SIGALRM interrupts Python between bytecodes, so it also ends a spec stuck in a training loop;
    # it exists only on Unix and only in the main thread.
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return (yield)
    if _deadline:  # a seed of a repeated spec: the spec's one timer bounds all its seeds together
        if time.monotonic() >= _deadline[-1]:
            raise SpecTimeout(f"the spec ran longer than --timeout={seconds:g}s (its seeds together)")
        return (yield)

    def expire(signum, frame):
        raise SpecTimeout(f"the spec ran longer than --timeout={seconds:g}s")

    previous = signal.signal(signal.SIGALRM, expire)
    _deadline.append(time.monotonic() + seconds)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return (yield)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _deadline.clear()


#: When the running spec's time is up (monotonic clock); empty between specs. Only the main thread sets it.
_deadline: list[float] = []
