"""``sft-spec compare BASE.json HEAD.json``: what a change did, spec by spec and check by check.

A CI gate is read as a difference: main's results against the pull request's. For every spec (matched
by node id) the comparison names the outcome transition (passed -> failed, new, removed), each check
whose outcome or answer changed (with a character diff), the metric and final-loss deltas, the recipe
settings that differ, the library versions that differ (a TRL bump named as the likely cause), and the
time per phase. ``--fail-on-regression`` exits 1 when something that passed in BASE fails in HEAD, or a
metric worsens by more than a ``--tolerance NAME=AMOUNT``; ``--html`` and ``--md`` write it down.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_spec import hookimpl
from sft_spec.errors import UsageError
from sft_spec.reports import ExpectationReport, SpecReport

from .escape import md_code, md_text, safe
from .failures import char_diff
from .files import output_path

#: Outcomes that count as holding, and those that count as broken, for regressions.
HELD = {"passed", "xfailed"}
BROKEN = {"failed", "error", "interrupted"}
#: Metrics where a lower value is better (every other metric: higher is better).
_LOWER_IS_BETTER = re.compile(r"loss|perplexity|edit_distance|seconds|duration|learnt_at_step|learns_within")


def lower_is_better(name: str) -> bool:
    return bool(_LOWER_IS_BETTER.search(name))


@dataclass
class CaseChange:
    name: str
    before: str | None  # outcome, None when the case is new
    after: str | None  # None when removed
    answer_before: str | None = None
    answer_after: str | None = None
    scores: list[tuple[str, float | None, float | None]] = field(default_factory=list)

    @property
    def regressed(self) -> bool:
        return self.before in HELD and self.after in BROKEN

    @property
    def answer_changed(self) -> bool:
        return self.answer_before is not None and self.answer_after is not None and \
            self.answer_before != self.answer_after

    @property
    def diff(self) -> str:
        return char_diff(self.answer_before or "", self.answer_after or "")


@dataclass
class SpecChange:
    nodeid: str
    before: str | None
    after: str | None
    cases: list[CaseChange] = field(default_factory=list)
    metrics: list[tuple[str, float | None, float | None]] = field(default_factory=list)
    settings: list[tuple[str, Any, Any]] = field(default_factory=list)
    phases: list[tuple[str, float | None, float | None]] = field(default_factory=list)
    losses: tuple[list[float], list[float]] = ([], [])
    error_after: str = ""

    @property
    def transition(self) -> str:
        if self.before is None:
            return "new"
        if self.after is None:
            return "removed"
        if (self.before in HELD and self.after in BROKEN) or any(c.regressed for c in self.cases):
            return "regressed"
        if self.before in BROKEN and self.after in HELD:
            return "fixed"
        changed = self.before != self.after or any(c.before != c.after or c.answer_changed for c in self.cases)
        return "changed" if changed or self.settings else "unchanged"


@dataclass
class Comparison:
    base: dict[str, Any]
    head: dict[str, Any]
    specs: list[SpecChange]
    versions: list[tuple[str, Any, Any]]
    tolerances: dict[str, float] = field(default_factory=dict)
    #: What makes --fail-on-regression fail: outcome regressions and metrics past their tolerance.
    regressions: list[str] = field(default_factory=list)

    def count(self, transition: str) -> int:
        return sum(s.transition == transition for s in self.specs)


def _differences(before: dict, after: dict) -> list[tuple[str, Any, Any]]:
    from .recorded import flatten

    flat_before, flat_after = flatten(before), flatten(after)
    return [(key, flat_before.get(key), flat_after.get(key)) for key in sorted(set(flat_before) | set(flat_after))
            if flat_before.get(key) != flat_after.get(key)]


def _scores(case: ExpectationReport | None, report: SpecReport | None) -> dict[str, float]:
    """A case's metric values: its checks' scores, and an eval set's aggregates (pass_rate, mean_chrf, ...)."""
    if case is None:
        return {}
    out = {c.name: float(c.score) for c in case.checks if c.score is not None and c.name != "eval"}
    if report is not None:
        aggregates = (report.extra.get("eval") or {}).get(case.nodeid, {}).get("aggregates", {})
        out.update({k: float(v) for k, v in aggregates.items() if isinstance(v, int | float)})
    return out


def _spec_metrics(report: SpecReport | None) -> dict[str, float]:
    if report is None:
        return {}
    return {k: float(v) for k, v in report.metrics.items()
            if k in ("final_loss", "train_seconds", "steps", "learnt_at_step") and isinstance(v, int | float)}


def _case_name(nodeid: str, spec: str) -> str:
    return nodeid[len(spec) + 2:] if nodeid.startswith(spec + "::") else nodeid


def compare_reports(base_meta: dict, base: list[SpecReport], head_meta: dict, head: list[SpecReport],
                    tolerances: dict[str, float] | None = None) -> Comparison:
    tolerances = dict(tolerances or {})
    by_base, by_head = {r.nodeid: r for r in base}, {r.nodeid: r for r in head}
    specs = []
    for nodeid in [*by_base, *(n for n in by_head if n not in by_base)]:
        old, new = by_base.get(nodeid), by_head.get(nodeid)
        change = SpecChange(nodeid, old.outcome if old else None, new.outcome if new else None)
        old_cases = {c.nodeid: c for c in (old.cases if old else [])}
        new_cases = {c.nodeid: c for c in (new.cases if new else [])}
        # A spec that errored (or was interrupted) has no cases of its own: each of BASE's cases shares its fate.
        fate = new.outcome if new is not None and not new.cases and new.outcome in BROKEN else None
        for case_id in [*old_cases, *(n for n in new_cases if n not in old_cases)]:
            a, b = old_cases.get(case_id), new_cases.get(case_id)
            before_scores, after_scores = _scores(a, old), _scores(b, new)
            names = sorted(set(before_scores) | set(after_scores))
            change.cases.append(CaseChange(
                _case_name(case_id, nodeid), a.outcome if a else None, b.outcome if b else fate,
                a.answer if a else None, b.answer if b else None,
                [(k, before_scores.get(k), after_scores.get(k)) for k in names]))
        before_metrics, after_metrics = _spec_metrics(old), _spec_metrics(new)
        change.metrics = [(k, before_metrics.get(k), after_metrics.get(k))
                          for k in sorted(set(before_metrics) | set(after_metrics))]
        if old and new:
            change.settings = _differences(old.settings, new.settings)
            change.phases = [(k, old.phases.get(k), new.phases.get(k)) for k in dict.fromkeys([*old.phases,
                                                                                                *new.phases])]
            change.losses = (list(old.losses), list(new.losses))
        if new is not None and new.error is not None:
            change.error_after = new.error.message
        specs.append(change)
    versions = _differences((base_meta.get("environment") or {}).get("packages") or {},
                            (head_meta.get("environment") or {}).get("packages") or {})
    comparison = Comparison(base_meta, head_meta, specs, versions, tolerances)
    comparison.regressions = _regressions(comparison)
    return comparison


def _worsened(name: str, before: float | None, after: float | None, tolerance: float) -> bool:
    if before is None or after is None:
        return False
    change = after - before
    return change > tolerance if lower_is_better(name) else -change > tolerance


def _regressions(comparison: Comparison) -> list[str]:
    out = []
    for spec in comparison.specs:
        if spec.before in HELD and spec.after in BROKEN and not any(c.regressed for c in spec.cases):
            out.append(f"{spec.nodeid}: {spec.before} -> {spec.after}")
        for case in spec.cases:
            if case.regressed:
                out.append(f"{spec.nodeid}::{case.name}: {case.before} -> {case.after}")
            for name, before, after in case.scores:
                if name in comparison.tolerances and _worsened(name, before, after, comparison.tolerances[name]):
                    out.append(f"{spec.nodeid}::{case.name}: {name} {before:.4g} -> {after:.4g} "
                               f"(tolerance {comparison.tolerances[name]:g})")
        for name, before, after in spec.metrics:
            if name in comparison.tolerances and _worsened(name, before, after, comparison.tolerances[name]):
                out.append(f"{spec.nodeid}: {name} {before:.4g} -> {after:.4g} "
                           f"(tolerance {comparison.tolerances[name]:g})")
    return out


# -- text ------------------------------------------------------------------------------------------------


def _delta(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return f"{'-' if before is None else f'{before:.4g}'} -> {'-' if after is None else f'{after:.4g}'}"
    return f"{before:.4g} -> {after:.4g} ({after - before:+.4g})"


def text_lines(comparison: Comparison, verbose: bool = False) -> list[str]:
    """The comparison for a terminal or a log, every line escaped."""
    base, head = comparison.base, comparison.head
    lines = [f"BASE: {base.get('created', '?')} {' '.join(base.get('command', []))}",
             f"HEAD: {head.get('created', '?')} {' '.join(head.get('command', []))}"]
    if comparison.versions:
        lines.append("library versions differ (a likely cause of what changed): "
                     + ", ".join(f"{k} {a} -> {b}" for k, a, b in comparison.versions))
    for spec in comparison.specs:
        if spec.transition == "unchanged" and not verbose:
            continue
        lines.append(f"{spec.nodeid}: {spec.before or 'new'} -> {spec.after or 'removed'}"
                     + (" (REGRESSION)" if spec.transition == "regressed" else f" ({spec.transition})"))
        for case in spec.cases:
            if case.before == case.after and not case.answer_changed and not verbose:
                continue
            lines.append(f"    {case.name}: {case.before or 'new'} -> {case.after or 'removed'}")
            if case.answer_changed:
                lines.append(f"        answer: {case.answer_before} -> {case.answer_after}")
                lines.append(f"        diff:   {case.diff}   ([-BASE-] {{+HEAD+}})")
            lines.extend(f"        {name} {_delta(a, b)}" for name, a, b in case.scores if a != b)
        if spec.settings:
            lines.append("    settings: " + ", ".join(f"{k} {a} -> {b}" for k, a, b in spec.settings))
        lines.extend(f"    {name} {_delta(a, b)}" for name, a, b in spec.metrics if a != b and name != "train_seconds")
        if spec.error_after:
            lines.append(f"    error: {spec.error_after.splitlines()[0]}")
    counts = {t: comparison.count(t) for t in ("regressed", "fixed", "changed", "new", "removed", "unchanged")}
    lines.append(", ".join(f"{n} {t}" for t, n in counts.items()))
    if comparison.regressions:
        lines.append(f"{len(comparison.regressions)} regression(s): " + "; ".join(comparison.regressions))
    return [safe(line) for line in lines]


def comparison_markdown(comparison, heading: str = "##") -> str:
    lines = [f"{heading} sft-spec compare: {len(comparison.regressions)} regression(s)", ""]
    counts = {t: comparison.count(t) for t in ("regressed", "fixed", "changed", "new", "removed", "unchanged")}
    lines += [", ".join(f"{n} {t}" for t, n in counts.items()), ""]
    if comparison.versions:
        lines += ["Library versions differ (a likely cause): " + md_text(
            ", ".join(f"{k} {a} -> {b}" for k, a, b in comparison.versions)), ""]
    changed = [s for s in comparison.specs if s.transition != "unchanged"]
    if changed:
        lines += ["| spec | BASE | HEAD | |", "| --- | --- | --- | --- |"]
        for spec in changed:
            lines.append(f"| {md_text(spec.nodeid)} | {spec.before or 'new'} | {spec.after or 'removed'} | "
                         f"{'**regression**' if spec.transition == 'regressed' else spec.transition} |")
    for spec in changed:
        details = []
        for case in spec.cases:
            if case.answer_changed:
                details.append(f"{case.name}: {case.before} -> {case.after}\n  answer: {case.answer_before} -> "
                               f"{case.answer_after}\n  diff:   {case.diff}")
        if spec.settings:
            details.append("settings: " + ", ".join(f"{k} {a} -> {b}" for k, a, b in spec.settings))
        if details:
            lines += ["", f"**{md_text(spec.nodeid)}**", "", md_code("\n".join(details))]
    return "\n".join(lines) + "\n"


# -- the command ---------------------------------------------------------------------------------------


def parse_tolerances(values: list[str]) -> dict[str, float]:
    out = {}
    for value in values or []:
        name, _, amount = value.partition("=")
        try:
            out[name.strip()] = float(amount)
        except ValueError:
            raise UsageError(f"--tolerance {value!r}: expected NAME=AMOUNT, e.g. final_loss=0.05 or chrf=5") from None
    return out


def _arguments(parser) -> None:
    parser.add_argument("base", type=Path, metavar="BASE.json", help="results of the run to compare against (main)")
    parser.add_argument("head", type=Path, metavar="HEAD.json", help="results of the run to review (the change)")
    parser.add_argument("--fail-on-regression", action="store_true",
                        help="exit 1 when a check that passed in BASE fails in HEAD, or a metric worsens by more "
                        "than its --tolerance")
    parser.add_argument("--tolerance", action="append", default=[], metavar="NAME=AMOUNT",
                        help="how much a metric may worsen (final_loss=0.05, chrf=5, pass_rate=0.02, ...)")
    parser.add_argument("--html", dest="html_path", type=output_path, metavar="PATH",
                        help="write the comparison as HTML")
    parser.add_argument("--md", dest="md_path", type=output_path, metavar="PATH",
                        help="write the comparison as Markdown (a CI summary)")
    parser.add_argument("-v", "--verbose", action="store_true", help="list unchanged specs and checks too")


def _run(options, pluginmanager) -> int:
    from .files import atomic_write_text
    from .json_report import load_document

    base_meta, base = load_document(options.base)
    head_meta, head = load_document(options.head)
    comparison = compare_reports(base_meta, base, head_meta, head, parse_tolerances(options.tolerance))
    for line in text_lines(comparison, options.verbose):
        print(line)
    if options.html_path:
        from .compare_html import render_comparison

        atomic_write_text(options.html_path, render_comparison(comparison))
        print(f"comparison HTML: {options.html_path}")
    if options.md_path:
        atomic_write_text(options.md_path, comparison_markdown(comparison))
        print(f"comparison Markdown: {options.md_path}")
    return 1 if options.fail_on_regression and comparison.regressions else 0


@hookimpl
def sft_spec_register_commands(register):
    register("compare", "compare two results files (BASE and HEAD): transitions, answer diffs, metric deltas",
             _arguments, _run)
