"""``sft-spec run -n N``: specs run in N worker processes, reports come back in collection order.

Workers are fresh Python processes (multiprocessing's ``spawn``: no forked torch or CUDA state).
Each rebuilds the plugin manager from the same command line (entry points and ``-p`` modules; plugin
*objects* passed to ``cli.main(plugins=...)`` stay in the main process, where every report is logged),
collects the same paths and runs the specs it is sent through ``sft_spec_run_spec``, the same hook a
serial run calls. The main process logs each report in collection order, so reporters (terminal,
JUnit, JSON, HTML) see what a serial run would show. With GPUs each worker gets its own device
(``CUDA_VISIBLE_DEVICES``); on a CPU the cores are shared out (``OMP_NUM_THREADS``). A worker that
dies (out of memory, a segfault) is reported as an error of the spec it ran ("worker crashed: exit
code -9"), a new worker takes over, and the other specs still run. With ``--update-snapshots`` or
``--update-baselines`` the specs run serially: those files are written per spec file while a spec
runs. Under pytest, pytest-xdist does this job (``pytest -n 4 --dist loadscope specs/``).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import hookimpl
from .errors import UsageError
from .reports import ErrorInfo, SpecReport

if TYPE_CHECKING:
    from .loader import SpecItem
    from .session import Session

#: Set in every worker (like pytest-xdist's PYTEST_XDIST_WORKER): ``gw0``, ``gw1``, ...
WORKER_ENV = "SFT_SPEC_WORKER"
#: Plugin objects that print or record in the main process only.
_MAIN_ONLY = ("terminalreporter", "lfplugin", "json_reporter", "junitxml_reporter", "html_reporter")


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


def _selection(item: SpecItem) -> tuple[list[int], list[str]]:
    return [e.index for e in item.selected_expectations], [name for name, _, _ in item.training_checks]


def crash_report(item: SpecItem, exitcode: int | None, message: str = "") -> SpecReport:
    spec = item.spec
    return SpecReport(
        nodeid=item.nodeid, path=str(item.location.path), name=item.name, variant=item.variant, outcome="error",
        tags=list(spec.tags), model=spec.model.id, method=spec.method,
        error=ErrorInfo(message or f"worker crashed: exit code {exitcode}", location=str(item.location),
                        phase="run", kind="crash"),
    )


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


def run_parallel(session: Session, numprocesses: str | int, argv: list[str]) -> None:
    """Run ``session.items`` in worker processes; log reports in collection order."""
    config = session.config
    items = session.items
    if not items:
        return
    device = config.getoption("device", "auto") or "auto"
    gpus = visible_gpus(device)
    n = worker_count(numprocesses, len(items), gpus)
    updating = [flag for flag, dest in (("--update-snapshots", "update_snapshots"),
                                        ("--update-baselines", "update_baselines")) if config.getoption(dest)]
    if updating:
        # Recorded answers and curves are saved per spec file while a spec runs: workers writing the
        # same file would lose each other's entries.
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"-n: {updating[0]} records files, so the specs run one after another")
        session.run_items()
        return
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

    pending = deque(range(len(items)))
    results: dict[int, SpecReport] = {}
    logged = 0
    maxfail = config.getoption("maxfail") or 0
    failures = len(session.collect_errors)
    workers: list[_Worker] = []
    next_slot = n

    def dispatch(worker: _Worker) -> None:
        if pending and not session.shouldstop:
            index = pending.popleft()
            worker.current = index
            worker.send(("run", index, items[index].nodeid, _selection(items[index])))
        else:
            worker.current = None
            worker.stopped = True
            worker.send(("stop",))

    def flush(final: bool = False) -> None:
        nonlocal logged, failures
        while logged < len(items) and (logged in results or final):
            report = results.pop(logged, None)
            logged += 1
            if report is None:
                continue
            session.log_report(report)
            if report.outcome == "interrupted":
                session.interrupted = True
            if report.outcome in ("failed", "error") or (report.outcome == "xpassed"
                                                        and report.metrics.get("xfail_strict")):
                failures += 1
                if maxfail and failures >= maxfail and not session.shouldstop:
                    session.shouldstop = f"stopping after {failures} failure{'s' if failures > 1 else ''}"

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
        results[index] = payload if isinstance(payload, SpecReport) else _from_json(payload)
        worker.current = None


def _from_json(text: str) -> SpecReport:
    import json

    from sft_spec_plugins.json_report import report_from_dict

    return report_from_dict(json.loads(text))


# -- the worker side -------------------------------------------------------------------------------


class _Forward:
    """Sends the spec's progress to the main process, whose terminal reporter shows it."""

    def __init__(self, conn):
        self.conn = conn
        self.index = -1

    @hookimpl
    def sft_spec_run_progress(self, item, phase, step, total, loss):
        self.conn.send(("progress", self.index, phase, step, total, loss))


def _worker_session(setup: WorkerSetup, also_unregister: tuple[str, ...] = ()) -> Session:
    from .cli import _disabled, make_parser
    from .config import Config
    from .plugins import build_registry, make_plugin_manager
    from .session import Session

    disabled, extra_modules = _disabled(setup.argv)
    problems: list[Any] = []
    pm = make_plugin_manager(extra_modules, disabled, problems)
    if problems:
        raise RuntimeError("; ".join(f"plugin {p.name!r}: {p.message}" for p in problems))
    options = make_parser(pm).parse_args(setup.argv)
    options.paths = [Path(p) for p in setup.paths]
    options.numprocesses = None
    config = Config(options=options, pluginmanager=pm, registry=build_registry(pm), rootdir=Path(setup.rootdir),
                    cache_dir=Path(setup.cache_dir), output_dir=Path(setup.output_dir), invocation_args=setup.argv)
    pm.hook.sft_spec_configure(config=config)
    for name in _MAIN_ONLY + also_unregister:
        plugin = pm.get_plugin(name)
        if plugin is not None:
            pm.unregister(plugin)
    session = Session(config)
    session.collect(options.paths)
    return session


def worker_main(conn, setup: WorkerSetup) -> None:
    # Before torch is imported: the device and thread count this worker owns.
    os.environ.update(setup.env)
    os.chdir(setup.cwd)
    try:
        session = _worker_session(setup)
    except BaseException as exc:  # noqa: BLE001 - told to the main process, which reports it
        conn.send(("setup_failed", f"{type(exc).__name__}: {exc}"))
        return
    forward = _Forward(conn)
    session.config.pluginmanager.register(forward, "sft-spec-worker-progress")
    by_id = {item.nodeid: item for item in session.items}
    all_checks = {item.nodeid: list(item.training_checks) for item in session.items}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] != "run":
            return
        _, index, nodeid, (expectations, checks) = message
        forward.index = index
        item = by_id.get(nodeid)
        if item is None:
            raise RuntimeError(f"{nodeid} was not collected in the worker")  # reported as a crash
        for exp in item.expectations:
            exp.selected = exp.index in expectations
        item.training_checks = [c for c in all_checks[nodeid] if c[0] in checks]
        report = session.hook.sft_spec_run_spec(item=item, session=session)
        payload: Any = report
        try:
            pickle.dumps(report)
        except Exception:  # a plugin put something unpicklable in the report: send its JSON form
            import json

            payload = json.dumps(report.to_dict(), default=str)
        conn.send(("report", index, payload))
