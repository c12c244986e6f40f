"""The session: collect spec files, run every item through the loop hook, decide the exit code; also the
internal plugin that collects ``*.sft.yaml`` files and runs items one after another (``-n`` answers first)."""

from __future__ import annotations

import dataclasses
import enum
import os
import time
from pathlib import Path

from . import hookimpl
from .config import Config
from .errors import PluginProblem, SpecError, SpecErrors, UsageError, nodeid_path, relpath
from .loading import LoadContext, is_spec_file, load_spec_file
from .reports import ErrorInfo, SpecReport
from .state import SpecItem


class ExitCode(enum.IntEnum):
    """As pytest's, so CI scripts read them the same way."""

    OK = 0
    TESTS_FAILED = 1
    INTERRUPTED = 2
    INTERNAL_ERROR = 3
    USAGE_ERROR = 4
    NO_TESTS_COLLECTED = 5


class Session:
    def __init__(self, config: Config):
        self.config = config
        self.items: list[SpecItem] = []
        #: Files that did not load and plugins that are broken: errors of their own, logged first.
        self.collect_errors = [plugin_error_report(p) for p in getattr(config.pluginmanager, "problems", [])]
        self.reports: list[SpecReport] = []
        self.deselected: int = 0
        self.empty_ok = ""  # why a run with nothing selected passes (an --shard slice that holds no spec)
        self.start_time = time.time()
        self.shouldstop: str = ""
        self.interrupted = False
        self.failures = 0
        self.internal_errors: list[str] = []  # plugins' bugs: exit 3, as pytest's INTERNALERROR
        self.load_context = LoadContext(config)
        self.configured = False
        self.started = False

    # -- the lifecycle, the same in every process: the CLI, -n workers, launched ranks, Ray actors, pytest --

    def configure(self) -> None:
        """``sft_spec_configure``, then pluggy's ``check_pending``: a plugin registered at configure time (a
        reporter) with a misspelled hook is a usage error in every process, not a hook never called."""
        self.hook.sft_spec_configure(config=self.config)
        self.configured = True
        self.config.pluginmanager.check_pending()

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.hook.sft_spec_session_start(session=self)

    def finish(self, exitstatus: int) -> None:
        """``sft_spec_session_finish`` (not for ``--collect-only``), even when collection or the run failed,
        so reports are written: every implementation runs, one's bug is an internal error."""
        if self.configured and not getattr(self.config.options, "collect_only", False):
            self.internal_errors += [f"sft_spec_session_finish: {p}" for p in self.call_each(
                self.hook.sft_spec_session_finish, session=self, exitstatus=int(exitstatus))]

    def unconfigure(self) -> None:
        if self.configured:
            self.configured = False
            self.hook.sft_spec_unconfigure(config=self.config)

    @property
    def hook(self):
        return self.config.pluginmanager.hook

    def collect(self, paths: list[Path]) -> None:
        for path in paths:
            if not path.exists():
                raise UsageError(f"file or directory not found: {path}")
        files: list[Path] = []
        for path in paths:
            files.extend(_spec_files(path) if path.is_dir() else [path])
        seen = set()
        for file in files:
            key = file.resolve()
            if key in seen:
                continue
            seen.add(key)
            try:
                self.items.extend(self.hook.sft_spec_collect_file(path=file, session=self) or [])
            except SpecError as exc:  # the file's broken matrix entries; the others still run
                self.items.extend(getattr(exc, "items", []))
                self.collect_errors.append(collect_error_report(file, exc, self.config.rootdir))
        self.hook.sft_spec_collection_modifyitems(session=self, items=self.items)

    def run_item(self, item: SpecItem) -> SpecReport:
        """A reused report (result cache) or a fresh run, in this process."""
        report = self.hook.sft_spec_reuse_report(item=item, session=self)
        return report if report is not None else self.hook.sft_spec_run_spec(item=item, session=self)

    def call_each(self, hook, **kwargs) -> list[str]:
        """Call a resilient hook (a report's or the session's): every implementation runs even after one
        raised, whose problem is returned; later ones see ``exitstatus`` 3. Wrappers wrap it as usual."""
        with self.config.pluginmanager.each_runs() as problems:
            try:
                hook(**kwargs)
            except Exception as exc:  # noqa: BLE001 - an old-style hookwrapper (hookwrapper=True) is not guarded:
                problems.append(f"{type(exc).__name__}: {exc}")  # its bug is still reported, the session goes on
        return problems

    def log_report(self, report: SpecReport) -> SpecReport:
        """Persist what the report records (on this, the main process), log it, count it for ``--maxfail``;
        returns the report as logged (an error of its own when persisting failed)."""
        problems = self.call_each(self.hook.sft_spec_persist_report, report=report, session=self)
        if problems:  # a full disk fails this spec, not the session
            report = persist_failed(report, problems)
        self.reports.append(report)
        self.internal_errors += [f"sft_spec_log_report: {p}" for p in
                                 self.call_each(self.hook.sft_spec_log_report, report=report, session=self)]
        if report.outcome == "interrupted":
            self.interrupted = True
        if is_failure(report):
            self.failures += 1
            maxfail = self.config.getoption("maxfail") or 0
            if maxfail and self.failures >= maxfail and not self.shouldstop:
                self.shouldstop = f"stopping after {self.failures} failure{'s' if self.failures > 1 else ''}"
        return report

    def exitstatus(self) -> ExitCode:
        if self.interrupted:
            return ExitCode.INTERRUPTED
        if self.internal_errors:
            return ExitCode.INTERNAL_ERROR
        if not self.reports and not self.items:
            return ExitCode.OK if self.empty_ok else ExitCode.NO_TESTS_COLLECTED
        if any(is_failure(r) for r in self.reports):
            return ExitCode.TESTS_FAILED
        return ExitCode.OK


def persist_failed(report: SpecReport, problems: list[str]) -> SpecReport:
    """The report logged for a spec whose files could not be saved: persisting is the last step of making it,
    so this is a new report; the one the persist hooks were given stays as they saw it."""
    message = "could not save the files this spec records: " + "; ".join(problems)
    if report.outcome in ("error", "interrupted"):  # its own error (or the interrupt) stays what it ended with
        return dataclasses.replace(report, notes=[*report.notes, message])
    return dataclasses.replace(report, outcome="error", error=ErrorInfo(message, location=report.path,
                                                                        phase="persist"))


def is_failure(report: SpecReport) -> bool:
    # A strict XPASS was decided once, per case (its check fails, so the case and the spec fail): a spec
    # that ends "xpassed" had every case decided by a non-strict mark, its own being the closest.
    return report.outcome in ("failed", "error", "interrupted")


def _spec_files(root: Path) -> list[Path]:
    """Spec files below ``root``, sorted; skips folders as pytest's norecursedirs, survives symlink loops."""
    found = []
    for folder, dirs, files in os.walk(root, onerror=lambda _: None, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("node_modules", "__pycache__", "venv"))
        found.extend(Path(folder) / f for f in files if is_spec_file(Path(f)))
    return sorted(found)


def collect_error_report(file: Path, exc: SpecError, rootdir: Path | None = None) -> SpecReport:
    """A file that did not load: the user's input, not a crash, so its located message is the whole story."""
    shown, errors = relpath(file), (exc.errors if isinstance(exc, SpecErrors) else [exc])
    nodeid = nodeid_path(file, rootdir)
    return SpecReport(nodeid=nodeid, path=shown, name=nodeid, variant=None, outcome="error", error=ErrorInfo(
        "\n".join(map(str, errors)), location=str(errors[0].location or shown), phase="collect", count=len(errors)))


def plugin_error_report(problem: PluginProblem) -> SpecReport:
    nodeid = f"plugin:{problem.name}"
    return SpecReport(nodeid=nodeid, path="", name=nodeid, variant=None, outcome="error", error=ErrorInfo(
        f"plugin {problem.name!r} is broken: {problem.message}", location=nodeid, phase="plugin"))


# -- the built-in collection plugin and loop -------------------------------------------------------


@hookimpl(trylast=True)
def sft_spec_collect_file(path: Path, session: Session) -> list[SpecItem] | None:
    if not is_spec_file(path):
        return None
    return load_spec_file(path, session.load_context)


@hookimpl(trylast=True)
def sft_spec_runtestloop(session: Session) -> bool:
    for item in session.items:
        if session.shouldstop or session.interrupted:
            break
        session.log_report(session.run_item(item))
    return True
