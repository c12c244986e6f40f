"""What the file reporters share: render once at the end of the session, write atomically, and name
the file (or why it could not be written) in the terminal summary."""

from __future__ import annotations

import platform
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from sft_spec import __version__, hookimpl
from sft_spec.reports import SpecReport

from .files import atomic_write_text

SCHEMA_VERSION = 1
#: Distributions whose versions every report carries: they decide what a recipe learns.
PACKAGES = ("sft-spec", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers",
            "bitsandbytes")


def case_outcome_counts(reports: list[SpecReport]) -> dict[str, int]:
    """Counts as pytest shows them: one per expectation, one per errored spec."""
    counts: dict[str, int] = {}
    for report in reports:
        if report.outcome in ("error", "interrupted") or not report.cases:
            key = report.outcome if report.outcome != "interrupted" else "interrupted"
            counts[key] = counts.get(key, 0) + 1
            continue
        for case in report.cases:
            counts[case.outcome] = counts.get(case.outcome, 0) + 1
    return counts


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(reports: list[SpecReport], requested_device: str | None) -> dict[str, Any]:
    """Versions and device, so a result can be compared with another machine's."""
    devices = sorted({str(r.settings["device"]) for r in reports if r.settings.get("device")})
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "device": ", ".join(devices) or requested_device or "",
        "requested_device": requested_device or "",
    }


def session_meta(session, complete: bool, exitstatus: int | None) -> dict[str, Any]:
    """Everything in the results document except the specs: shared by the JSON, JUnit and HTML reporters."""
    from .selection import SHARD

    config = session.config
    reports = list(session.reports)
    shard = {"shard": config.stash[SHARD]} if SHARD in config.stash else {}
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "sft-spec", "version": __version__},
        "created": datetime.fromtimestamp(session.start_time, timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        "exitstatus": exitstatus,
        "interrupted": bool(session.interrupted),
        "command": ["sft-spec", *config.invocation_args],
        "rootdir": str(config.rootdir),
        "environment": environment(reports, config.getoption("device")),
        "summary": {
            "outcomes": case_outcome_counts(reports),
            "specs": len(reports),
            "deselected": session.deselected,
            "duration": round(time.time() - session.start_time, 3),
        },
        **shard,
    }


class FileReporter:
    label = "report"

    def __init__(self, config, path: Path):
        self.config = config
        self.path = Path(path)
        self.written = False
        self.problem = ""

    def render(self, reports, meta) -> str:
        raise NotImplementedError

    def attempt(self, write) -> None:
        """Run ``write()``; an unwritable report path is noted for the summary, never fatal to the run."""
        try:
            write()
            self.written = True
            self.problem = ""
        except OSError as exc:
            self.problem = f"{type(exc).__name__}: {exc}"

    @hookimpl(trylast=True)  # after other plugins' session_finish: a crash there makes the exit status 3
    def sft_spec_session_finish(self, session, exitstatus):
        self.attempt(lambda: atomic_write_text(
            self.path, self.render(session.reports, session_meta(session, True, exitstatus))))

    @hookimpl
    def sft_spec_terminal_summary(self, session, write_line):
        if self.problem:
            write_line(f"{self.label}: could not write {self.path}: {self.problem}")
        elif self.written:
            write_line(f"{self.label}: {self.path}")
