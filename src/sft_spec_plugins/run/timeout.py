"""``--timeout SECONDS``: end a spec that runs too long; it is reported as an error, the others run."""

from __future__ import annotations

import signal
import threading
import time

from sft_spec import hookimpl
from sft_spec.errors import SpecTimeout


@hookimpl
def sft_spec_addoption(parser):
    parser.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                        help="end a spec that runs longer than SECONDS (load, training and generation together; "
                        "the process's library imports before its first spec are not counted)")


@hookimpl(wrapper=True, tryfirst=True)  # outermost: another plugin's wrapper is timed too
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

    # The process's library imports first, untimed: an import cut short leaves torch half-imported for
    # every later spec, and it is the process's cost (seconds, once), not the spec's.
    from .protocol import import_training_libraries

    if not item.spec.skip:  # a skipped spec imports nothing
        try:
            import_training_libraries()
        except Exception:  # noqa: BLE001, S110 - the run's own import phase reports it, as that spec's error
            pass
    previous = signal.signal(signal.SIGALRM, expire)
    try:
        _deadline.append(time.monotonic() + seconds)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        return (yield)
    except SpecTimeout as exc:  # outside the run's phases (a plugin's own run, a launcher's wait): its error
        from sft_spec.reports import ErrorInfo

        from .protocol import new_report

        report = new_report(item, "error")
        report.error = ErrorInfo(str(exc), location=str(item.location), phase="run", kind="timeout")
        return report
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _deadline.clear()


#: A year: longer is no timeout a run could reach, and setitimer refuses what overflows it.
MAX_TIMEOUT = 365 * 24 * 3600.0


def _seconds(text: str) -> float:
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"expected seconds above 0 and at most {MAX_TIMEOUT:.0f} (a year), "
                                         f"got {text!r}")
    return value


#: When the running spec's time is up (monotonic clock); empty between specs. Only the main thread sets it.
_deadline: list[float] = []
