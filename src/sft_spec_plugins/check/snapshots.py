"""Snapshot checks: ``snapshot: true`` compares an answer with the one recorded beside the spec.

Answers live in ``__snapshots__/<spec file name>.yaml``, keyed by test id (``name[variant]::expect[i]``),
so a changed answer shows up as a one-line diff in review. ``--update-snapshots`` records new answers
and rewrites changed ones (and drops entries no test uses any more); the terminal summary lists what
was added, changed or is unused. The check decides (a recorded answer passes) wherever the spec runs;
the file is written on the main process, before the report is logged (``sft_spec_persist_report``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft_spec import hookimpl
from sft_spec.registry import Check, CheckContext, CheckResult
from sft_spec.state import StashKey

from ..common.recorded import RecordedFile, recorded_path, short_id

FOLDER = "__snapshots__"
HEADER = ("# Answers recorded by `sft-spec run --update-snapshots` for `snapshot: true` checks.\n"
          "# Keyed by test id; review changes like code.\n")


def snapshot_path(spec_path: Path) -> Path:
    return recorded_path(spec_path, FOLDER)


def _valid(value: Any) -> str | None:
    return None if value is True else f"snapshot: expected true, got {value!r}"


def snapshot(answer: str, _: Any, ctx: CheckContext) -> CheckResult:
    path = snapshot_path(ctx.item.path)
    recorded = RecordedFile(path, HEADER)
    key = short_id(ctx.case.nodeid)
    if ctx.config is not None and ctx.config.getoption("update_snapshots"):
        old = None if recorded.error else recorded.entries.get(key)
        if old == answer:
            return CheckResult(True, "")
        return CheckResult(True, "snapshot recorded" if old is None else f"snapshot updated (was {old!r})")
    if recorded.error:
        return CheckResult(False, f"{recorded.error}; rewrite it with --update-snapshots")
    if key not in recorded.entries:
        return CheckResult(False, f"no snapshot recorded for {key} in {path}; record it with --update-snapshots")
    expected = recorded.entries[key]
    ok = answer == expected
    return CheckResult(ok, "" if ok else f"the answer differs from the snapshot in {path} "
                       "(accept it with --update-snapshots)", expected=None if ok else str(expected))


@hookimpl
def sft_spec_register_checks(register) -> None:
    register(Check("snapshot", snapshot, "true: the answer equals the one recorded in __snapshots__/ "
                   "(record with --update-snapshots)", _valid))


@hookimpl
def sft_spec_addoption(parser) -> None:
    parser.add_argument("--update-snapshots", action="store_true", dest="update_snapshots",
                        help="record answers of `snapshot: true` checks (new or changed) and drop unused ones")


class _State:
    def __init__(self) -> None:
        self.files: dict[Path, RecordedFile] = {}
        self.added: list[str] = []
        self.changed: list[str] = []
        self.incomplete: set[Path] = set()  # files with a broken spec: their entries cannot be judged
        self.unused: dict[Path, list[str]] = {}

    def load(self, path: Path) -> RecordedFile:
        if path not in self.files:
            self.files[path] = RecordedFile(path, HEADER)
        return self.files[path]


STATE = StashKey[_State]()


def _state(config) -> _State:
    return config.stash.setdefault(STATE, _State())


def _snapshot_exps(item) -> list:
    return [e for e in item.expectations if any(name == "snapshot" for name, _ in e.checks)]


@hookimpl
def sft_spec_persist_report(report, session) -> None:
    """``--update-snapshots``: the answers of this spec's snapshot checks go into its snapshot file."""
    if not session.config.getoption("update_snapshots") or not report.path:
        return
    state = _state(session.config)
    cases = [c for c in report.expectations if c.answer is not None and any(ch.name == "snapshot" for ch in c.checks)]
    if not cases:
        return
    recorded = state.load(snapshot_path(Path(report.path)))
    added, changed = [], []
    for case in cases:
        key = short_id(case.nodeid)
        old = recorded.entries.get(key)
        if old != case.answer:
            recorded.set(key, case.answer)
            (added if old is None else changed).append(case.nodeid)
    recorded.save()  # counted once written: a refused write is the spec's error, not an "added" line
    state.added += added
    state.changed += changed


@hookimpl
def sft_spec_log_report(report, session) -> None:
    # A spec that broke has no answers: its file's unused entries cannot be judged.
    if report.outcome in ("error", "interrupted") and report.path:
        _state(session.config).incomplete.add(snapshot_path(Path(report.path)))


def _unused(session) -> dict[Path, list[str]]:
    """Recorded entries no test id has any more, in files whose specs all ran with every expectation."""
    config = session.config
    if config.getoption("keyword") or config.getoption("markexpr") or session.shouldstop or session.interrupted:
        return {}
    state = _state(config)
    used: dict[Path, set[str]] = {}
    for item in session.items:
        path = snapshot_path(item.path)
        used.setdefault(path, set()).update(short_id(e.nodeid) for e in _snapshot_exps(item))
    out = {}
    for path, keys in used.items():
        if path in state.incomplete or not path.is_file():
            continue
        extra = sorted(set(state.load(path).entries) - keys)
        if extra:
            out[path] = extra
    return out


@hookimpl
def sft_spec_session_finish(session, exitstatus) -> None:
    state = _state(session.config)
    state.unused = _unused(session)
    if session.config.getoption("update_snapshots"):
        for path, keys in state.unused.items():
            recorded = state.load(path)
            for key in keys:
                recorded.remove(key)
            try:
                recorded.save()
            except OSError as exc:
                state.unused[path] = [f"could not remove them: {exc}"]


@hookimpl
def sft_spec_terminal_summary(session, write_line) -> None:
    state = session.config.stash.get(STATE, None)
    if state is None:
        return
    updating = session.config.getoption("update_snapshots")
    if state.added:
        write_line(f"snapshots: {len(state.added)} added: {', '.join(state.added)}")
    if state.changed:
        write_line(f"snapshots: {len(state.changed)} changed: {', '.join(state.changed)}")
    for path, keys in state.unused.items():
        verb = "removed" if updating else "unused (remove with --update-snapshots)"
        write_line(f"snapshots: {len(keys)} {verb} in {path}: {', '.join(keys)}")


@hookimpl
def sft_spec_cache_key(item, config):
    from ..common.recorded import recorded_hash

    return {"snapshots": recorded_hash(item.path, "__snapshots__")}
