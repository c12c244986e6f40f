"""``--history DIR``: every run appends its compact results to a folder, and the HTML report shows each
spec's last runs (outcome strip, final loss, metrics). For a project, put it in ``[tool.sft-spec]
addopts = "--history .sft-spec/history"``.

One file per run (``<time>-<pid>-<random>.json``, written atomically), so runs in parallel never write the same
file; a corrupt or partial entry is skipped with a warning, never fatal.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_spec import hookimpl
from sft_spec.state import StashKey

from ..common.files import atomic_write_text, output_path
from .report_files import strict_loads

#: Runs shown per spec in the HTML report.
SHOWN_RUNS = 20
HISTORY_VERSION = 1


@dataclass
class History:
    entries: list[dict[str, Any]] = field(default_factory=list)  # oldest first, this run last
    warnings: list[str] = field(default_factory=list)

    def trend(self, nodeid: str) -> list[dict[str, Any]]:
        """The spec's last runs, oldest first; a rerun answered from the result cache repeats an earlier
        result, so it is not a run of its own here."""
        out = []
        for entry in self.entries:
            spec = entry["specs"].get(nodeid)
            if spec is not None and not spec.get("cached"):
                commit = (entry.get("git") or {}).get("commit") or ""
                out.append({"created": entry.get("created", ""), "commit": commit[:10], **spec})
        return out[-SHOWN_RUNS:]


#: The history read at the end of this run (the HTML report reads it).
HISTORY = StashKey[History]()


def compact(report) -> dict[str, Any]:
    """What one run keeps of a spec: its outcome, final loss and every numeric score."""
    metrics: dict[str, float] = {}
    for case in report.cases:
        for check in case.checks:
            if check.score is not None and check.name not in ("repeat",):
                metrics[f"{case.nodeid.rsplit('::', 1)[-1]}.{check.name}"] = float(check.score)
    for nodeid, data in report.eval_sets.items():
        for name, value in (data.get("aggregates") or {}).items():
            if isinstance(value, int | float):
                metrics[f"{nodeid.rsplit('::', 1)[-1]}.{name}"] = float(value)
    final = report.metrics.get("final_loss")
    return {"outcome": report.outcome, "final_loss": final if isinstance(final, int | float) else None,
            "metrics": metrics, "cases": {c.nodeid: c.outcome for c in report.cases},
            "cached": report.cached}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _valid_spec(spec: Any) -> bool:
    return (isinstance(spec, dict) and isinstance(spec.get("outcome"), str)
            and (spec.get("final_loss") is None or _number(spec["final_loss"]))
            and isinstance(spec.get("metrics", {}), dict) and all(_number(v) for v in spec.get("metrics", {}).values())
            and isinstance(spec.get("cases", {}), dict))


def _valid(entry: Any) -> bool:
    """Every field the report reads, with its type: anything else is skipped, never a crash later."""
    git = entry.get("git") if isinstance(entry, dict) else None
    return (isinstance(entry, dict) and entry.get("history_version") == HISTORY_VERSION
            and isinstance(entry.get("created", ""), str) and isinstance(entry.get("specs"), dict)
            and (git is None or (isinstance(git, dict) and isinstance(git.get("commit") or "", str)))
            and all(_valid_spec(v) for v in entry["specs"].values()))


#: A history entry is a compact summary (a few KB per spec); a larger file is not one.
MAX_ENTRY_BYTES = 16 * 2**20


def read_history(folder: Path) -> History:
    history = History()
    if not folder.is_dir():
        return history
    for path in sorted(folder.glob("*.json")):
        if path.is_symlink() or not path.is_file():  # a link (out of the folder, to /dev/zero) is never followed
            history.warnings.append(f"skipped {path.name}: not a regular file of the history folder")
            continue
        if path.stat().st_size > MAX_ENTRY_BYTES:
            history.warnings.append(f"skipped {path.name}: over {MAX_ENTRY_BYTES // 2**20} MiB")
            continue
        try:
            entry = strict_loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            history.warnings.append(f"skipped {path.name}: not readable JSON ({type(exc).__name__})")
            continue
        if not _valid(entry):
            history.warnings.append(f"skipped {path.name}: not a history entry of this sft-spec")
            continue
        history.entries.append(entry)
    return history


class HistoryWriter:
    def __init__(self, config, folder: Path):
        self.config, self.folder = config, folder
        self.problem = ""
        self.written: Path | None = None

    @hookimpl
    def sft_spec_session_finish(self, session, exitstatus):
        created = time.strftime("%Y%m%dT%H%M%S", time.gmtime(session.start_time))
        from .report_files import git_state

        entry = {"history_version": HISTORY_VERSION, "created": created, "exitstatus": int(exitstatus),
                 "command": ["sft-spec", *self.config.invocation_args], "git": git_state(self.config),
                 "specs": {r.nodeid: compact(r) for r in session.reports if r.outcome != "deselected"}}
        # Sorted by name is in time order; the microseconds, pid and a random part keep two runs of one second
        # (or of one process) apart.
        micro = int(session.start_time * 1_000_000) % 1_000_000
        path = self.folder / f"{created}.{micro:06d}-{os.getpid()}-{uuid.uuid4().hex[:6]}.json"
        try:
            atomic_write_text(path, json.dumps(entry, ensure_ascii=False, indent=1, default=str))
            self.written = path
        except OSError as exc:
            self.problem = f"could not write {path}: {exc}"
        history = read_history(self.folder)
        if self.written is None and not self.problem:
            history.entries.append(entry)
        session.config.stash[HISTORY] = history

    @hookimpl
    def sft_spec_terminal_summary(self, session, write_line):
        history = session.config.stash.get(HISTORY, None)
        for warning in (history.warnings if history else []):
            write_line(f"history: {warning}")
        if self.problem:
            write_line(f"history: {self.problem}")
        elif self.written is not None:
            write_line(f"history: {len(history.entries) if history else 1} runs in {self.folder}")


@hookimpl
def sft_spec_addoption(parser):
    parser.add_argument("--history", dest="history_dir", type=output_path, metavar="DIR", default=None,
                        help="append this run's compact results to DIR; the HTML report shows each spec's last runs")


@hookimpl
def sft_spec_configure(config):
    folder = config.getoption("history_dir")
    if folder and config.role == "main":
        config.pluginmanager.register(HistoryWriter(config, Path(folder)), "history_writer")
