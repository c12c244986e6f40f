"""The session: collect spec files, select, run each spec through the hooks, decide the exit code.

This module is also the internal plugin that collects ``*.sft.yaml`` files and applies ``-k``/``-m``.
"""

from __future__ import annotations

import enum
import time
from pathlib import Path

from . import hookimpl
from .config import Config
from .errors import SpecError, SpecErrors, UsageError
from .loader import LoadContext, SpecItem, is_spec_file, load_spec_file
from .reports import ErrorInfo, SpecReport
from .selection import Expression, keyword_matcher, tag_matcher


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
        self.collect_errors: list[SpecReport] = []
        self.reports: list[SpecReport] = []
        self.deselected: int = 0
        self.start_time = time.time()
        self.shouldstop: str = ""
        self.interrupted = False
        self.load_context = LoadContext(config.registry, config.cache_dir, config.rootdir)

    @property
    def hook(self):
        return self.config.pluginmanager.hook

    # -- collection ------------------------------------------------------------------------------

    def collect(self, paths: list[Path]) -> None:
        for path in paths:
            if not path.exists():
                raise UsageError(f"file or directory not found: {path}")
        files: list[Path] = []
        for path in paths:
            if path.is_dir():
                files.extend(p for p in sorted(path.rglob("*")) if p.is_file() and is_spec_file(p)
                             and not _ignored(p, path))
            else:
                files.append(path)
        seen = set()
        for file in files:
            key = file.resolve()
            if key in seen:
                continue
            seen.add(key)
            try:
                for items in self.hook.sft_spec_collect_file(path=file, session=self):
                    self.items.extend(items or [])
            except SpecError as exc:
                self.collect_errors.append(collect_error_report(file, exc))
        self.hook.sft_spec_collection_modifyitems(session=self, items=self.items)

    # -- running ---------------------------------------------------------------------------------

    def run_items(self) -> None:
        maxfail = self.config.getoption("maxfail") or 0
        failures = len(self.collect_errors)
        for item in self.items:
            if self.shouldstop:
                break
            report = self.hook.sft_spec_run_spec(item=item, session=self)
            self.log_report(report)
            if report.outcome == "interrupted":
                self.interrupted = True
                break
            if report.outcome in ("failed", "error") or (report.outcome == "xpassed" and _strict(item)):
                failures += 1
                if maxfail and failures >= maxfail:
                    self.shouldstop = f"stopping after {failures} failure{'s' if failures > 1 else ''}"

    def log_report(self, report: SpecReport) -> None:
        self.reports.append(report)
        self.hook.sft_spec_log_report(report=report, session=self)

    def exitstatus(self) -> ExitCode:
        if self.interrupted:
            return ExitCode.INTERRUPTED
        if not self.reports and not self.items:
            return ExitCode.NO_TESTS_COLLECTED
        for report in self.reports:
            if report.outcome in ("failed", "error", "interrupted"):
                return ExitCode.TESTS_FAILED
            if report.outcome == "xpassed" and report.metrics.get("xfail_strict"):
                return ExitCode.TESTS_FAILED
        return ExitCode.OK


def _strict(item: SpecItem) -> bool:
    return bool(item.spec.xfail and item.spec.xfail.strict)


def _ignored(file: Path, root: Path) -> bool:
    """Skip hidden folders, virtualenvs and snapshot folders, as pytest's norecursedirs does."""
    parts = file.relative_to(root).parts[:-1]
    return any(p.startswith(".") or p in ("node_modules", "__pycache__", "__snapshots__", "venv") for p in parts)


def collect_error_report(file: Path, exc: SpecError) -> SpecReport:
    from .errors import relpath

    shown = relpath(file)
    errors = exc.errors if isinstance(exc, SpecErrors) else [exc]
    message = "\n".join(str(e) for e in errors)
    location = str(errors[0].location) if errors[0].location else shown
    return SpecReport(
        nodeid=shown, path=shown, name=shown, variant=None, outcome="error",
        # A spec error is the user's input, not a crash: its location is the whole story, no traceback.
        error=ErrorInfo(message=message, location=location, phase="collect"),
    )


# -- the built-in collection plugin ----------------------------------------------------------------


@hookimpl(trylast=True)
def sft_spec_collect_file(path: Path, session: Session) -> list[SpecItem] | None:
    if not is_spec_file(path):
        return None
    items = load_spec_file(path, session.load_context)
    extra: list[SpecError] = []
    for item in items:
        for results in session.hook.sft_spec_validate_spec(item=item, session=session):
            extra.extend(SpecError(message, item.location) for message in results or [])
    if extra:
        raise SpecErrors(extra)
    return items


@hookimpl(trylast=True)
def sft_spec_collection_modifyitems(session: Session, items: list[SpecItem]) -> None:
    keyword = session.config.getoption("keyword")
    markexpr = session.config.getoption("markexpr")
    if not keyword and not markexpr:
        return
    kexpr = Expression(keyword) if keyword else None
    mexpr = Expression(markexpr) if markexpr else None
    kept = []
    for item in items:
        if mexpr and not mexpr.evaluate(tag_matcher(item.tags)):
            session.deselected += 1
            continue
        if kexpr:
            for exp in item.expectations:
                exp.selected = kexpr.evaluate(keyword_matcher(exp.nodeid, item.tags))
            # Training checks are test cases too (``...::checks[loss_decreased]``), selected the same way.
            item.training_checks = [
                check for check in item.training_checks
                if kexpr.evaluate(keyword_matcher(f"{item.nodeid}::checks[{check[0]}]", item.tags))
            ]
            spec_selected = any(e.selected for e in item.expectations) or bool(item.training_checks)
            if not spec_selected:
                session.deselected += 1
                continue
        kept.append(item)
    items[:] = kept
