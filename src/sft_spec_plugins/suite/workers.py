"""``sft-spec run -n N``: specs run in N worker processes, reports come back in collection order.

This plugin answers ``sft_spec_runtestloop`` when ``-n`` is given, as pytest-xdist answers pytest's.
Workers are fresh Python processes (multiprocessing's ``spawn``: no forked torch or CUDA state), each
bootstrapped like the main process (``sft_spec.bootstrap.prepare_config``, role ``worker``: entry
points and ``-p`` modules; plugin *objects* passed to ``cli.main(plugins=...)`` stay in the main
process, where every report is logged). A worker collects the same paths and runs the specs it is
sent through ``sft_spec_run_spec``, the same hook a serial run calls; result-cache hits are decided
here, before a spec is sent. The main process logs each report in collection order, so reporters
(terminal, JUnit, JSON, HTML) and the files recorded beside specs (snapshots, baselines) see what a
serial run would. With GPUs each worker gets its own device (``CUDA_VISIBLE_DEVICES``); on a CPU the
cores are shared out (``OMP_NUM_THREADS``). A worker that dies (out of memory, a segfault) is reported
as an error of the spec it ran ("worker crashed: exit code -9"), a new worker takes over, and the
other specs still run. Under pytest, pytest-xdist does this job (``pytest -n 4 --dist loadscope specs/``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sft_spec import hookimpl
from sft_spec.bootstrap import prepare_config
from sft_spec.errors import UsageError
from sft_spec.reports import ErrorInfo, SpecReport, new_report, report_from_dict, report_to_dict
from sft_spec.session import Session

if TYPE_CHECKING:
    from sft_spec.state import SpecItem

#: Set in every worker (like pytest-xdist's PYTEST_XDIST_WORKER): ``gw0``, ``gw1``, ...
WORKER_ENV = "SFT_SPEC_WORKER"


@dataclass
class WorkerSetup:
    argv: list[str]
    cwd: str
    paths: list[str]
    rootdir: str
    cache_dir: str
    output_dir: str
    env: dict[str, str] = field(default_factory=dict)


def visible_gpus(device: str) -> list[str]:
    """GPU ids a worker may be given: those in CUDA_VISIBLE_DEVICES, else every CUDA device."""
    if device in ("cpu", "mps"):
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch build with CUDA: CPU workers
        return []


def worker_count(value: str | int, n_items: int, gpus: list[str]) -> int:
    """``-n auto``: one worker per GPU, else per CPU core; never more workers than specs."""
    if str(value) == "auto":
        n = len(gpus) or (os.cpu_count() or 1)
    else:
        try:
            n = int(value)
        except ValueError:
            raise UsageError(f"-n expects a number or 'auto', got {value!r}") from None
        if n < 0:
            raise UsageError(f"-n expects a number >= 0, got {n}")
    return max(1, min(n, n_items))


def crash_report(item: SpecItem, exitcode: int | None, message: str = "") -> SpecReport:
    report = new_report(item, "error")
    report.error = ErrorInfo(message or f"worker crashed: exit code {exitcode}", location=str(item.location),
                             phase="run", kind="crash")
    return report


class _Worker:
    def __init__(self, ctx, slot: int, setup: WorkerSetup):
        self.slot = slot
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child, setup), name=f"sft-spec-gw{slot}", daemon=True)
        self.process.start()
        child.close()
        self.current: int | None = None
        self.stopped = False

    def send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except (BrokenPipeError, OSError):
            pass  # it died: its sentinel tells the main loop


@hookimpl
def sft_spec_addoption(parser):
    parser.add_argument("-n", "--numprocesses", dest="numprocesses", default=None, metavar="N",
                        help="run specs in N worker processes ('auto': one per GPU, else per CPU core); "
                        "reports keep collection order")


@hookimpl(tryfirst=True)
def sft_spec_runtestloop(session: Session) -> bool | None:
    config = session.config
    if config.role != "main" or config.getoption("numprocesses") in (None, "0"):
        return None
    run_parallel(session, config.getoption("numprocesses"), list(config.invocation_args))
    return True


def run_parallel(session: Session, numprocesses: str | int, argv: list[str]) -> None:
    """Run ``session.items`` in worker processes; log reports in collection order."""
    config = session.config
    device = config.getoption("device", "auto") or "auto"
    gpus = visible_gpus(device)
    # Result-cache hits are decided here, before a worker is started or a spec sent.
    reused = {i: session.hook.sft_spec_reuse_report(item=item, session=session) for i, item in enumerate(session.items)}
    items = session.items
    todo = [i for i in range(len(items)) if reused[i] is None]
    if not todo:
        for i in range(len(items)):
            if session.shouldstop:
                break
            session.log_report(reused[i])
        return
    n = worker_count(numprocesses, len(todo), gpus)
    threads = max(1, (os.cpu_count() or 1) // n)
    ctx = multiprocessing.get_context("spawn")

    def setup_for(slot: int) -> WorkerSetup:
        env = {WORKER_ENV: f"gw{slot}", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
               "TOKENIZERS_PARALLELISM": "false"}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        return WorkerSetup(argv=list(argv), cwd=os.getcwd(), paths=[str(p) for p in config.getoption("paths", [])],
                           rootdir=str(config.rootdir), cache_dir=str(config.cache_dir),
                           output_dir=str(config.output_dir), env=env)

    pending = deque(todo)
    results: dict[int, SpecReport] = {i: r for i, r in reused.items() if r is not None}
    logged = 0
    workers: list[_Worker] = []
    next_slot = n

    def dispatch(worker: _Worker) -> None:
        if pending and not session.shouldstop:
            index = pending.popleft()
            worker.current = index
            worker.send(("run", index, items[index].nodeid, [c.nodeid for c in items[index].selected_cases]))
        else:
            worker.current = None
            worker.stopped = True
            worker.send(("stop",))

    def flush(final: bool = False) -> None:
        nonlocal logged
        # As a serial run would: in order, and nothing after -x/--maxfail stopped the run or Ctrl-C.
        while logged < len(items) and (logged in results or final) and not (session.shouldstop or
                                                                             session.interrupted):
            report = results.pop(logged, None)
            logged += 1
            if report is not None:
                session.log_report(report)  # counts failures for --maxfail and notes an interrupt

    try:
        for slot in range(n):
            worker = _Worker(ctx, slot, setup_for(slot))
            workers.append(worker)
            dispatch(worker)
        while any(w.current is not None for w in workers):
            busy = [w for w in workers if w.current is not None]
            ready = multiprocessing.connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for worker in busy:
                died = worker.process.sentinel in ready
                # Read what it sent (a dead worker may have sent its report just before exiting); a
                # bounded number of messages, so one chatty worker does not starve the others.
                budget = 1000 if died else 50
                while budget and worker.current is not None and worker.conn.poll():
                    budget -= 1
                    try:
                        message = worker.conn.recv()
                    except (EOFError, OSError):
                        break
                    if message[0] == "setup_failed":
                        # Every worker would fail the same way: all remaining specs get the message.
                        for index in [worker.current, *pending]:
                            results[index] = crash_report(items[index], None, f"worker could not start: {message[1]}")
                        pending.clear()
                        worker.current = None
                        worker.stopped = True
                        break
                    _handle(session, items, worker, message, results)
                    if message[0] == "report":
                        dispatch(worker)
                if died and worker.current is not None:
                    worker.process.join()
                    results[worker.current] = crash_report(items[worker.current], worker.process.exitcode)
                    worker.current = None
                    worker.stopped = True
                    if pending and not session.shouldstop:
                        # A fresh worker for the rest: the dead one's device is free again.
                        replacement = _Worker(ctx, next_slot, setup_for(worker.slot))
                        next_slot += 1
                        workers.append(replacement)
                        dispatch(replacement)
            flush()
            if session.interrupted:
                break
        flush(final=True)
    finally:
        for worker in workers:
            if worker.process.is_alive() and not worker.stopped:
                worker.send(("stop",))
        for worker in workers:
            worker.process.join(timeout=5 if not session.interrupted else 0.5)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=5)
            worker.conn.close()


def _handle(session: Session, items: list[SpecItem], worker: _Worker, message: tuple,
            results: dict[int, SpecReport]) -> None:
    kind = message[0]
    if kind == "progress":
        _, index, phase, step, total, loss = message
        session.hook.sft_spec_run_progress(item=items[index], phase=phase, step=step, total=total, loss=loss)
    elif kind == "report":
        _, index, payload = message
        results[index] = report_from_dict(payload)
        worker.current = None


# -- the worker side -------------------------------------------------------------------------------


class _Forward:
    """Sends the spec's progress to the main process, whose terminal reporter shows it."""

    def __init__(self, conn):
        self.conn = conn
        self.index = -1

    @hookimpl
    def sft_spec_run_progress(self, item, phase, step, total, loss):
        self.conn.send(("progress", self.index, phase, step, total, loss))


#: The options that select specs, and their values that select nothing out.
SELECTION_OPTIONS = {"keyword": None, "markexpr": None, "shard": None, "last_failed": False}


def worker_session(setup: WorkerSetup, select: bool = True) -> Session:
    """The same bootstrap as the main process, as a worker: no reporters, no result cache. ``select=False``:
    every spec under its paths, whatever -k, -m, --lf or --shard the command line had."""
    prepared = prepare_config(setup.argv, role="worker", addopts=False, paths=[Path(p) for p in setup.paths],
                              rootdir=Path(setup.rootdir), cache_dir=Path(setup.cache_dir),
                              output_dir=Path(setup.output_dir))
    if prepared.pluginmanager.problems:
        raise RuntimeError("; ".join(f"plugin {p.name!r}: {p.message}" for p in prepared.pluginmanager.problems))
    config = prepared.config
    for name, value in ({} if select else SELECTION_OPTIONS).items():
        if hasattr(config.options, name):
            setattr(config.options, name, value)
    session = Session(config)
    session.configure()
    try:
        session.collect(list(config.options.paths))
    except BaseException:
        session.unconfigure()
        raise
    return session


def worker_main(conn, setup: WorkerSetup) -> None:
    # Before torch is imported: the device and thread count this worker owns.
    os.environ.update(setup.env)
    os.chdir(setup.cwd)
    try:
        session = worker_session(setup)
    except BaseException as exc:  # noqa: BLE001 - told to the main process, which reports it
        conn.send(("setup_failed", f"{type(exc).__name__}: {exc}"))
        return
    forward = _Forward(conn)
    session.config.pluginmanager.register(forward, "sft-spec-worker-progress")
    by_id = {item.nodeid: item for item in session.items}
    try:
        _serve(conn, session, forward, by_id)
    finally:
        session.unconfigure()


def _serve(conn, session: Session, forward: _Forward, by_id: dict) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] != "run":
            return
        _, index, nodeid, selected = message
        forward.index = index
        item = by_id.get(nodeid)
        if item is None:
            raise RuntimeError(f"{nodeid} was not collected in the worker")  # reported as a crash
        for case in item.cases:
            case.selected = case.nodeid in selected
        report = session.hook.sft_spec_run_spec(item=item, session=session)
        # As JSON-safe data: a plugin's object in the report must not break the pipe.
        conn.send(("report", index, json.loads(json.dumps(report_to_dict(report), default=str))))
