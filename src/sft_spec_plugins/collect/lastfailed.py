"""``--lf``: rerun only what failed last time, as pytest's cache provider does.

After every ``sft-spec run`` the ids of failed checks and broken specs are written (atomically) to
``<cache dir>/lastfailed/<key>.json``; the key is a hash of the working directory, because test ids
are relative to it. The cache folder ($SFT_SPEC_CACHE, ``--cache-dir``, else ~/.cache/sft-spec)
keeps projects free of a cache folder to ignore. A passing id is removed; ids that did not run keep
their state. ``--lf`` then keeps the specs with a failed id and, inside them, only the failed checks;
when nothing failed last time it runs everything and says so.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sft_spec import hookimpl

from ..common.files import atomic_write_text


def lastfailed_path(cache_dir: Path, cwd: Path | None = None) -> Path:
    key = hashlib.sha256(str((cwd or Path.cwd()).resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir) / "lastfailed" / f"{key}.json"


def read_lastfailed(path: Path) -> dict[str, bool]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        failed = data.get("lastfailed", {})
        return {str(k): True for k in failed} if isinstance(failed, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}  # missing or corrupt: as if nothing failed


class LastFailed:
    def __init__(self, config):
        self.config = config
        self.path = lastfailed_path(config.cache_dir)
        self.lastfailed = read_lastfailed(self.path)
        self.status = ""

    @hookimpl(wrapper=True)
    def sft_spec_collection_modifyitems(self, session, items):
        # A wrapper, to filter after -k and -m (they set each expectation's selection afresh).
        result = yield
        if self.config.getoption("last_failed"):
            self._filter(session, items)
        return result

    def _filter(self, session, items) -> None:
        failed = self.lastfailed
        if not failed:
            self.status = "run-last-failure: no previously failed tests, not deselecting items."
            return
        kept, matched = [], set()
        for item in items:
            case_ids = [case.nodeid for case in item.cases]
            if item.nodeid in failed:  # the spec broke: all of it again
                kept.append(item)
                matched.add(item.nodeid)
                continue
            hits = [i for i in case_ids if i in failed]
            if not hits:
                continue
            matched.update(hits)
            for case in item.cases:
                case.selected = case.selected and case.nodeid in failed
            kept.append(item)
        matched.update(i for i in failed if any(r.nodeid == i for r in session.collect_errors))
        if not matched:
            self.status = (f"run-last-failure: {len(failed)} known failure{'s' if len(failed) != 1 else ''} "
                           "not in selected tests")
            return
        session.deselected += len(items) - len(kept)
        items[:] = kept
        self.status = f"run-last-failure: rerun previous {len(matched)} failure{'s' if len(matched) != 1 else ''}"

    @hookimpl(trylast=True)
    def sft_spec_session_start(self, session):
        # After the terminal reporter's header, as pytest shows it in its header.
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if self.status and reporter is not None and reporter.verbosity >= 0:
            reporter.write_line(self.status)

    @hookimpl
    def sft_spec_log_report(self, report, session):
        failed = self.lastfailed
        if report.outcome == "interrupted":
            return
        if report.outcome == "error":
            failed[report.nodeid] = True
            return
        failed.pop(report.nodeid, None)
        failed.pop(report.path, None)  # the file collects again
        for case in report.cases:
            if case.outcome == "failed":  # a strict XPASS included: apply_xfail decided it failed
                failed[case.nodeid] = True
            else:
                failed.pop(case.nodeid, None)

    @hookimpl
    def sft_spec_session_finish(self, session, exitstatus):
        text = json.dumps({"cwd": str(Path.cwd().resolve()), "lastfailed": dict(sorted(self.lastfailed.items()))},
                          indent=1, ensure_ascii=False)
        try:
            atomic_write_text(self.path, text + "\n")
        except OSError:
            pass  # a read-only cache only loses --lf


@hookimpl
def sft_spec_addoption(parser):
    parser.add_argument("--lf", "--last-failed", action="store_true", dest="last_failed",
                        help="rerun only the checks that failed (and specs that broke) last time; "
                        "all when none failed")


@hookimpl
def sft_spec_configure(config):
    # With --collect-only it only selects: the session's finish hooks (which write) do not run then.
    if config.role == "main":
        config.pluginmanager.register(LastFailed(config), "lfplugin")
