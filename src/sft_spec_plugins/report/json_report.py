"""``--json PATH``: every result in a versioned JSON document, and ``sft-spec report`` to re-render it.

The file is rewritten atomically after each spec, so a run stopped by Ctrl-C or a crash still leaves
the results so far (``"complete": false``). The document's shape is described by
``schemas/results.schema.json``; readers should check ``schema_version`` and refuse what they do not know.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from sft_spec import hookimpl
from sft_spec.errors import UsageError
from sft_spec.reports import SpecReport, report_from_dict

from ..common.files import atomic_write_text, output_path
from .report_files import READABLE_VERSIONS, SCHEMA_VERSION, FileReporter, session_meta, strict_loads


def results_document(session, complete: bool, exitstatus: int | None) -> dict[str, Any]:
    doc = session_meta(session, complete, exitstatus)
    doc["specs"] = [report.to_dict() for report in session.reports]
    return doc


def _finite(value: Any) -> Any:
    """NaN and infinity (a diverged loss) as strings: ``NaN`` is not JSON, strict readers reject it."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(doc: dict[str, Any]) -> str:
    # Settings and check arguments come from YAML and plugins: anything not JSON-native is shown as text.
    return json.dumps(_finite(doc), ensure_ascii=False, indent=2, default=str, allow_nan=False) + "\n"


def write_document(path: Path, doc: dict[str, Any]) -> None:
    text = dumps(doc)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a broken decoder: escape them instead of failing
        text = json.dumps(_finite(doc), ensure_ascii=True, indent=2, default=str, allow_nan=False) + "\n"
    atomic_write_text(path, text)


# -- reading back ------------------------------------------------------------------------------------


#: A results file larger than this is not one sft-spec wrote (a 10,000-row eval set is a few MB).
MAX_RESULTS_BYTES = 512 * 2**20


def _schema_problem(doc: Any) -> str | None:
    """Where a results document departs from schemas/results.schema.json, as ``$.json.path: message``."""
    from importlib.resources import files

    import jsonschema

    schema = json.loads(files("sft_spec_plugins.report").joinpath("schemas/results.schema.json").read_text("utf-8"))
    error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(doc))
    return None if error is None else f"{error.json_path}: {error.message[:300]}"


def load_document(path: Path) -> tuple[dict[str, Any], list[SpecReport]]:
    """The meta part and the reports of a results file, validated against the results schema before anything
    reads it (results files come from CI artifacts: untrusted); a usage error naming the file and the JSON
    path for anything else."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"results file not found: {path}")
    if not path.is_file() or path.stat().st_size > MAX_RESULTS_BYTES:
        raise UsageError(f"{path}: not a results file (a regular file of at most {MAX_RESULTS_BYTES // 2**20} MiB)")
    try:
        doc = strict_loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise UsageError(f"{path}: not a results file: {exc}") from None
    if not isinstance(doc, dict) or "schema_version" not in doc:
        raise UsageError(f"{path}: not an sft-spec results file (no schema_version)")
    if doc["schema_version"] not in READABLE_VERSIONS or isinstance(doc["schema_version"], bool):
        raise UsageError(f"{path}: schema_version {doc['schema_version']!r} is not supported "
                         f"(this sft-spec reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    problem = _schema_problem(doc)
    if problem:
        raise UsageError(f"{path}: malformed results file at {problem}")
    specs = doc.get("specs", [])
    if not isinstance(specs, list):
        raise UsageError(f"{path}: malformed results file: specs must be a list")
    for i, spec in enumerate(specs):
        problem = _malformed(spec)
        if problem:
            raise UsageError(f"{path}: malformed spec entry {i}: {problem}")
    try:
        reports = [report_from_dict(d) for d in specs]
    except (TypeError, KeyError, AttributeError) as exc:
        raise UsageError(f"{path}: malformed spec entry: {exc}") from None
    seen: dict[str, int] = {}
    for i, report in enumerate(reports):  # one id twice: which one is the result? Neither is taken.
        if report.nodeid in seen:
            raise UsageError(f"{path}: spec entries {seen[report.nodeid]} and {i} have the same id {report.nodeid!r}")
        seen[report.nodeid] = i
    meta = {k: v for k, v in doc.items() if k != "specs"}
    return meta, reports


#: The shape readers rely on: a field of the wrong type is refused here, not a crash in a reader.
_SHAPES = {"nodeid": str, "outcome": str, "metrics": dict, "settings": dict, "phases": dict, "extra": dict,
           "notes": list, "losses": list, "expectations": list, "training_checks": list}


def _malformed(spec: Any) -> str | None:
    if not isinstance(spec, dict):
        return "not an object"
    for key, kind in _SHAPES.items():
        if key in spec and not isinstance(spec[key], kind):
            return f"{key} must be {'an object' if kind is dict else 'a list' if kind is list else 'a string'}"
    for case in [*spec.get("expectations", []), *spec.get("training_checks", [])]:
        if not isinstance(case, dict) or not isinstance(case.get("checks", []), list) or \
                not all(isinstance(c, dict) for c in case.get("checks", [])):
            return "a case must be an object with a list of checks"
    return None






# -- the reporter ------------------------------------------------------------------------------------


class JSONReporter(FileReporter):
    """Rewrites the whole file after every spec, so an interrupted run still leaves what finished."""

    label = "JSON report"

    def _write(self, session, complete: bool, exitstatus: int | None) -> None:
        self.attempt(lambda: write_document(self.path, results_document(session, complete, exitstatus)))

    @hookimpl
    def sft_spec_session_start(self, session):
        self._write(session, complete=False, exitstatus=None)

    @hookimpl
    def sft_spec_log_report(self, report, session):
        self._write(session, complete=False, exitstatus=None)

    @hookimpl(trylast=True)
    def sft_spec_session_finish(self, session, exitstatus):
        self._write(session, complete=True, exitstatus=exitstatus)


@hookimpl
def sft_spec_addoption(parser):
    parser.add_argument("--json", dest="json_path", type=output_path, metavar="PATH", default=None,
                        help=f"write every result as JSON (schema_version {SCHEMA_VERSION}), "
                        "updated after each spec")


@hookimpl
def sft_spec_configure(config):
    path = config.getoption("json_path")
    if path and config.role == "main":
        config.pluginmanager.register(JSONReporter(config, path), "json_reporter")


# -- `sft-spec report` -------------------------------------------------------------------------------


def _add_report_arguments(parser) -> None:
    parser.add_argument("results", type=Path, nargs="?", metavar="RESULTS.json",
                        help="a file written by `sft-spec run --json`")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="RESULTS.json",
                        help="join the results of several runs (--shard slices, CI matrix jobs) into one report; exits "
                        "with the status one run of the whole suite would have, 1 when a part is missing")
    parser.add_argument("--json", dest="json_path", type=output_path, metavar="PATH", help="write the (merged) results")
    parser.add_argument("--html", dest="html_path", type=output_path, metavar="PATH", help="write an HTML report")
    parser.add_argument("--junitxml", dest="junitxml_path", type=output_path, metavar="PATH",
                        help="write a JUnit XML report")
    parser.add_argument("--history", dest="history_dir", type=output_path, metavar="DIR",
                        help="show each spec's last runs from this --history folder in the HTML report")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="with no file to write: a line per check, as `sft-spec run -v`")


def _shard_of(path: Path, meta: dict) -> dict | None:
    """A part's --shard record, checked: a malformed one is a usage error, not a traceback."""
    shard = meta.get("shard")
    if shard is None:
        return None
    ok = (isinstance(shard, dict) and all(isinstance(shard.get(k), int) and not isinstance(shard.get(k), bool)
                                          for k in ("index", "count", "sliced_out"))
          and isinstance(shard.get("specs"), list) and all(isinstance(i, str) for i in shard["specs"]))
    if not ok or not 1 <= shard["index"] <= shard["count"] <= MAX_SHARDS:
        raise UsageError(f"{path}: malformed results file: shard must hold index and count (1 <= index <= count "
                         f"<= {MAX_SHARDS}), sliced_out and specs (a list of ids)")
    return shard


#: More parts than any CI matrix runs; a record claiming more is forged (and would be listed shard by shard).
MAX_SHARDS = 10_000


def merge_documents(paths: list[Path]) -> tuple[dict[str, Any], list[SpecReport]]:
    """One results document from several: counts recomputed, and complete only when every part is and,
    for --shard runs, every shard of one suite is there with a result for every spec (``missing`` says
    what is not). Specs of --shard runs come in the collection order of a single run; others in the order
    given (a spec in two files: the later one). The exit status is what one run would have had: an
    interruption, internal or usage error first, then a failure (a failed spec of a part that never
    finished counts), and "no specs" (5) only when no part ran any."""
    from sft_spec.session import is_failure

    from .report_files import case_outcome_counts

    metas, by_id, missing, seen_paths, unexplained = [], {}, [], set(), []
    for path in paths:
        if Path(path).resolve() in seen_paths:
            print(f"warning: {path} is given twice: read once", file=sys.stderr)
            continue
        seen_paths.add(Path(path).resolve())
        meta, reports = load_document(path)
        metas.append((path, meta, _shard_of(path, meta)))
        if meta.get("exitstatus") == 1 and not any(is_failure(r) for r in reports):
            unexplained.append(path)
        for report in reports:
            by_id[report.nodeid] = report
        if not meta.get("complete") or not isinstance(meta.get("exitstatus"), int):
            missing.append(f"{path} is incomplete: its run did not finish")
    shards = [shard for _, _, shard in metas if shard is not None]
    order: dict[str, int] = {}
    if shards:
        first = shards[0]
        order = {nodeid: i for i, nodeid in enumerate(first["specs"])}
        if len(shards) != len(metas):
            missing.append("some files are --shard parts and some are not")
        if any(s["count"] != first["count"] or s["specs"] != first["specs"] for s in shards):
            missing.append("the files are shards of different suites or splits (their spec lists differ)")
        seen = {s["index"] for s in shards}
        missing += [f"shard {i}/{first['count']}" for i in range(1, first["count"] + 1) if i not in seen]
        missing += [f"{nodeid} has no result" for nodeid in first["specs"] if nodeid not in by_id]
    reports = sorted(by_id.values(), key=lambda r: order.get(r.nodeid, -1)) if order else list(by_id.values())
    statuses = {m.get("exitstatus") for _, m, _ in metas if isinstance(m.get("exitstatus"), int)}
    # As Session.exitstatus orders them: interrupted, internal error, usage error, then a failure among
    # the merged reports (a spec in two files counts as its later report).
    worst = next((s for s in (2, 3, 4) if s in statuses), None)
    failed = any(is_failure(r) for r in reports)
    # A part that exited 1 with no failing report of its own failed for a reason its reports do not hold (a
    # baseline it could not write, an interrupted collection): the merge cannot clear it. A part whose failure
    # a later file reran and passed is cleared, as a rerun clears it.
    failed = failed or bool(unexplained)
    exitstatus = worst if worst is not None else 1 if failed else 5 if statuses == {5} else 0
    meta = dict(metas[0][1])
    meta["interrupted"] = any(m.get("interrupted") for _, m, _ in metas)
    meta.pop("shard", None)
    deselected = (meta.get("summary") or {}).get("deselected", 0) - shards[0]["sliced_out"] if shards else 0
    meta.update(complete=not missing, exitstatus=exitstatus, merged_from=[str(p) for p in paths],
                **({"missing": missing} if missing else {}),
                summary={"outcomes": case_outcome_counts(reports), "specs": len(reports),
                         "deselected": max(0, deselected) if isinstance(deselected, int) else 0,
                         "duration": sum((m.get("summary") or {}).get("duration", 0) for _, m, _ in metas)})
    return meta, reports


def _run_report(options, pluginmanager) -> int:
    if bool(options.merge) == bool(options.results):
        raise UsageError("give one RESULTS.json, or --merge A.json B.json ...")
    meta, reports = merge_documents(options.merge) if options.merge else load_document(options.results)
    if not options.html_path and not options.junitxml_path and not options.json_path:
        from .terminal import print_results  # no file asked for: the run as its terminal showed it

        print_results(reports, meta, verbose=options.verbose)
        return int(meta["exitstatus"]) or (1 if meta.get("missing") else 0) if options.merge else 0
    for problem in meta.get("missing", []) if options.merge else []:
        print(f"warning: {problem}: the merged report is marked incomplete", file=sys.stderr)
    if options.json_path:
        # Written in this version's layout (a version-1 file read here was migrated on load), so labelled so.
        write_document(options.json_path, {**meta, "schema_version": SCHEMA_VERSION,
                                           "specs": [r.to_dict() for r in reports]})
        print(f"JSON results: {options.json_path}")
    if options.html_path:
        from .history import read_history
        from .html_report import render_html

        history = read_history(options.history_dir) if options.history_dir else None
        atomic_write_text(options.html_path, render_html(reports, meta, history))
        print(f"HTML report: {options.html_path}")
    if options.junitxml_path:
        from .junitxml import render_junitxml

        atomic_write_text(options.junitxml_path, render_junitxml(reports, meta))
        print(f"JUnit XML report: {options.junitxml_path}")
    if options.merge:  # the gate of a split suite: one run's exit status, and a failure when a part is missing
        return int(meta["exitstatus"]) or (1 if meta.get("missing") else 0)
    return 0


@hookimpl
def sft_spec_register_commands(register):
    register("report", "re-render HTML or JUnit XML reports from a --json results file, without training",
             _add_report_arguments, _run_report)

