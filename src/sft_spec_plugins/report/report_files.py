"""What the file reporters share: render once at the end of the session, write atomically, and name
the file (or why it could not be written) in the terminal summary."""

from __future__ import annotations

import functools
import json
import math
import platform
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from sft_spec import __version__, hookimpl
from sft_spec.reports import SpecReport
from sft_spec.state import StashKey

from ..common.files import atomic_write_text

SCHEMA_VERSION = 2
#: Versions this sft-spec reads. 2 moved each spec's eval sets and its cache flag to fields of their own
#: (``eval_sets``, ``cached``; 1 kept them in ``extra.eval`` and ``metrics.cached``): a version-1 reader
#: would find no eval set in a version-2 file and must refuse it, so the version changed.
READABLE_VERSIONS = (1, 2)
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


@functools.cache
def plugin_distributions() -> dict[str, str]:
    """Every installed distribution that provides an sft-spec plugin, with its version: a plugin decides
    results as much as a library does (and `sft-spec bisect` can bisect it)."""
    from sft_spec.pluginmanager import ENTRY_POINT_GROUP

    found = {}
    for dist in metadata.distributions():
        if any(ep.group == ENTRY_POINT_GROUP for ep in dist.entry_points):
            name = dist.metadata["Name"]
            if name and name != "sft-spec":
                found[name] = dist.version
    return dict(sorted(found.items()))


def environment(reports: list[SpecReport], requested_device: str | None) -> dict[str, Any]:
    """Versions and device, so a result can be compared with another machine's."""
    devices = sorted({str(r.settings["device"]) for r in reports if r.settings.get("device")})
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "plugins": plugin_distributions(),
        "device": ", ".join(devices) or requested_device or "",
        "requested_device": requested_device or "",
    }


_GIT = StashKey[Any]()


def git_state(config) -> dict[str, Any] | None:
    """The project's git commit and whether its tracked files differ from it, read once per run: what a
    reviewer would otherwise dig for. None outside a git checkout."""
    if _GIT not in config.stash:
        import subprocess

        def git(*args: str) -> str | None:
            try:
                done = subprocess.run(["git", "-C", str(config.rootdir), *args], capture_output=True, text=True,
                                      timeout=10)
            except (OSError, subprocess.SubprocessError):
                return None
            return done.stdout.strip() if done.returncode == 0 else None

        commit = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--untracked-files=no") if commit else None
        config.stash[_GIT] = {"commit": commit, "dirty": bool(changes)} if commit else None
    return config.stash[_GIT]


def session_meta(session, complete: bool, exitstatus: int | None) -> dict[str, Any]:
    """Everything in the results document except the specs: shared by the JSON, JUnit and HTML reporters."""
    from ..collect.selection import SHARD

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
        "git": git_state(config),
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


def logged_every(report: SpecReport) -> int:
    """Optimizer steps between two logged losses (``training.logging_steps``; a ratio below 1 is a share of
    the run's steps, as in transformers)."""
    every = ((report.settings or {}).get("training") or {}).get("logging_steps", 1)
    steps = report.metrics.get("steps")
    if isinstance(every, float) and 0 < every < 1 and isinstance(steps, int | float):
        return max(1, math.ceil(every * steps))
    return every if isinstance(every, int) and not isinstance(every, bool) and every >= 1 else 1


# -- reading files sft-spec may not have written ----------------------------------------------------


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON (sft-spec writes a non-finite number as a string)")


#: Deeper than this is no file sft-spec wrote (its deepest values sit about ten levels down).
MAX_DEPTH = 64


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 18:  # int("1" + 400 zeros) parses, then overflows every float() downstream
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits is no count or measure sft-spec writes")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: infinity by another spelling
        raise ValueError(f"{text} is not a finite number (sft-spec writes a non-finite number as a string)")
    return value


def strict_loads(text: str) -> Any:
    """JSON from a file sft-spec may not have written (results, history, shard records): NaN, Infinity,
    numbers that overflow a float and nesting deeper than ``MAX_DEPTH`` are refused with a ValueError."""
    doc = json.loads(text, parse_constant=_refuse_constant, parse_int=_bounded_int, parse_float=_finite_float)
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]
    return doc
