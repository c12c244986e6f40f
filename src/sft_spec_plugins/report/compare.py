"""``sft-spec compare BASE.json HEAD.json``: what a change did, spec by spec and check by check, and
whether that is more than noise.

A CI gate is read as a difference: main's results against the pull request's. For every spec (matched
by node id) the comparison names the outcome transition (passed -> failed, new, removed), each check
whose outcome or answer changed (with a character diff), the recipe settings and library versions that
differ (a TRL bump named as the likely cause), and every compared quantity with its noise
(``uncertainty.py``): an eval set's pass rate and metric means with rows paired by key (McNemar's exact
test on the rows that flipped, listed worst first with both answers), a canary case's share of passing
seeds (Fisher's exact test), the final loss and the step it learnt at. Each quantity gets a verdict
against its practical margin (``--tolerance NAME=AMOUNT`` or a documented default): worse, better, no
detectable change or inconclusive, after Holm's correction over the whole comparison.

``--fail-on-regression`` exits 1 on a case that passed in BASE and broke in HEAD, and on a quantity that
is worse by more than its margin at ``--alpha``; ``--fail-on-inconclusive`` on an inconclusive one too.
One Comparison is rendered the same way in the terminal, HTML (``--html``), Markdown (``--md``) and JSON
(``--json``): the items of :func:`findings`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sft_spec import hookimpl
from sft_spec.errors import UsageError, did_you_mean
from sft_spec.reports import ExpectationReport, SpecReport

from ..check.metrics import CJK, METRICS
from ..common import uncertainty as u
from ..common.escape import md_code, md_text, safe
from ..common.files import output_path
from ..common.uncertainty import Difference
from .failures import char_diff

#: Outcomes that count as holding, and those that count as broken, for regressions.
HELD = {"passed", "xfailed"}
BROKEN = {"failed", "error", "interrupted"}
#: What a spec that held in BASE may become in HEAD without running its checks: counted as a removal.
MUTED = ("skipped", "deselected")


def removal(spec) -> str:
    if spec.after is None:
        return "removed" + (" (it failed in BASE: the failure is hidden, not fixed)" if spec.before in BROKEN else "")
    return f"{spec.after} (its checks no longer run)" if spec.after in MUTED else f"{spec.after} (now expected to fail)"
#: Metrics where a lower value is better (every other metric: higher is better).
_LOWER_IS_BETTER = re.compile(r"loss|perplexity|edit_distance|seconds|duration|learnt_at_step|learns_within|memory")
METRIC_HIGHER_IS_BETTER = {name: metric.higher_is_better for name, metric in METRICS.items()}


def lower_is_better(name: str) -> bool:
    return not name.endswith("_per_second") and bool(_LOWER_IS_BETTER.search(name))


@dataclass
class CaseChange:
    name: str
    before: str | None  # outcome, None when the case is new
    after: str | None  # None when removed
    answer_before: str | None = None
    answer_after: str | None = None
    scores: list[tuple[str, float | None, float | None]] = field(default_factory=list)
    #: HEAD's eval set failed a threshold judged with confidence: its interval straddles the bound.
    inconclusive: bool = False

    @property
    def broke(self) -> bool:
        return self.before in HELD and self.after in BROKEN

    @property
    def regressed(self) -> bool:
        return self.broke and not self.inconclusive

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
    #: What changed in what the model was taught (the loss mask, the rendered text): the likely cause.
    causes: list[str] = field(default_factory=list)
    #: The gate counts something of this spec (set once the comparison's regressions are known).
    counted: bool = False

    @property
    def label(self) -> str:
        """What every rendering calls this spec: "regressed" whenever the gate counts something of it."""
        return "regressed" if self.counted else self.transition

    @property
    def transition(self) -> str:
        if self.before is None:
            return "new"
        if self.after is None:
            return "removed"
        broke = [c for c in self.cases if c.broke]
        if any(c.regressed for c in broke) or (self.before in HELD and self.after in BROKEN and not broke):
            return "regressed"
        hidden = self.after == "xfailed" or any(c.before is not None and c.after is None for c in self.cases)
        if self.before in BROKEN and self.after in HELD and not hidden:  # a check deleted or xfailed fixes nothing
            return "fixed"
        changed = self.before != self.after or any(c.before != c.after or c.answer_changed for c in self.cases)
        return "changed" if changed or self.settings else "unchanged"


@dataclass
class Comparison:
    base: dict[str, Any]
    head: dict[str, Any]
    specs: list[SpecChange]
    versions: list[tuple[str, Any, Any]]
    tolerances: dict[str, tuple[float, float]] = field(default_factory=dict)
    quantities: list[Quantity] = field(default_factory=list)
    alpha: float = 0.05
    fail_on_inconclusive: bool = False
    #: What makes --fail-on-regression fail: outcome regressions, specs removed or muted, worse quantities
    #: (and inconclusive ones with --fail-on-inconclusive).
    regressions: list[str] = field(default_factory=list)
    #: Ids (or globs) of specs whose removal from HEAD is on purpose (--allow-removed).
    allow_removed: list[str] = field(default_factory=list)
    #: What a reader must know before reading the rest (few specs matched).
    notes: list[str] = field(default_factory=list)

    def allowed(self, nodeid: str) -> bool:
        from fnmatch import fnmatchcase

        # The id itself first: its brackets ("expect[0]", "eval[golden]") are a character class to a glob.
        return any(nodeid == pattern or fnmatchcase(nodeid, pattern) for pattern in self.allow_removed)

    def count(self, transition: str) -> int:
        return sum(s.label == transition for s in self.specs)

    def headline(self) -> str:
        """The title every rendering uses: specs, as the counts beside it are, then the gate's findings."""
        if not self.regressions:
            return "no regression"
        specs = sum(s.counted for s in self.specs)
        findings = len(self.regressions)
        return (f"{specs} spec{'' if specs == 1 else 's'} regressed ({findings} finding"
                f"{'' if findings == 1 else 's'} counted by the gate)")

    def verdicts(self, spec: str) -> list[Quantity]:
        return [q for q in self.quantities if q.spec == spec]


def _differences(before: dict, after: dict) -> list[tuple[str, Any, Any]]:
    from ..common.recorded import flatten

    flat_before, flat_after = flatten(before), flatten(after)
    return [(key, flat_before.get(key), flat_after.get(key)) for key in sorted(set(flat_before) | set(flat_after))
            if flat_before.get(key) != flat_after.get(key)]


def _scores(case: ExpectationReport | None, report: SpecReport | None) -> dict[str, float]:
    """A case's metric values: its checks' scores, and an eval set's aggregates (pass_rate, mean_chrf, ...)."""
    if case is None:
        return {}
    out = {c.name: float(c.score) for c in case.checks if c.score is not None and c.name != "eval"}
    if report is not None:
        aggregates = report.eval_sets.get(case.nodeid, {}).get("aggregates", {})
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
                    tolerances: dict[str, tuple[float, float]] | None = None, alpha: float = 0.05,
                    fail_on_inconclusive: bool = False, allow_removed: list[str] | None = None) -> Comparison:
    tolerances = dict(tolerances or {})
    quantities: list[Quantity] = []
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
            verdict = (new.eval_sets.get(case_id) or {}).get("verdict") if new else None
            change.cases.append(CaseChange(
                _case_name(case_id, nodeid), a.outcome if a else None, b.outcome if b else fate,
                a.answer if a else None, b.answer if b else None,
                [(k, before_scores.get(k), after_scores.get(k)) for k in names], verdict == "inconclusive"))
        before_metrics, after_metrics = _spec_metrics(old), _spec_metrics(new)
        change.metrics = [(k, before_metrics.get(k), after_metrics.get(k))
                          for k in sorted(set(before_metrics) | set(after_metrics))]
        if old and new:
            change.settings = _differences(old.settings, new.settings)
            change.phases = [(k, old.phases.get(k), new.phases.get(k)) for k in dict.fromkeys([*old.phases,
                                                                                                *new.phases])]
            change.losses = (list(old.losses), list(new.losses))
            change.causes = mask_causes(old.mask, new.mask)
        if new is not None and new.error is not None:
            change.error_after = new.error.message
        if old and new:
            sets_b, sets_h = old.eval_sets, new.eval_sets
            for set_id in [k for k in sets_b if k in sets_h]:
                quantities += _eval_quantities(nodeid, _case_name(set_id, nodeid), sets_b[set_id], sets_h[set_id],
                                               old, new, tolerances)
            quantities += _seed_quantities(nodeid, old, new, tolerances)
        specs.append(change)
    versions = _differences((base_meta.get("environment") or {}).get("packages") or {},
                            (head_meta.get("environment") or {}).get("packages") or {})
    # Holm's family is what the gate counts; the recipe's cost, named but not counted, is a family of its own.
    counted = [q.difference.name not in COST or q.difference.name in tolerances for q in quantities]
    u.decide([q.difference for q, c in zip(quantities, counted, strict=True) if c], alpha)
    u.decide([q.difference for q, c in zip(quantities, counted, strict=True) if not c], alpha)
    comparison = Comparison(base_meta, head_meta, specs, versions, tolerances, quantities, alpha,
                            fail_on_inconclusive, allow_removed=list(allow_removed or []))
    matched = sum(n in by_head for n in by_base)
    if by_base and matched < len(by_base) / 2:
        comparison.notes.append(
            f"only {matched} of BASE's {len(by_base)} specs are in HEAD: specs are matched by their id, relative to "
            f"the suite's root (BASE {base_meta.get('rootdir', '?')}, HEAD {head_meta.get('rootdir', '?')}); a "
            "results file of sft-spec before 0.2 named them from the working directory: rerun BASE")
    comparison.regressions = _regressions(comparison)
    for spec in comparison.specs:
        spec.counted = any(r.startswith((f"{spec.nodeid}: ", f"{spec.nodeid}::")) for r in comparison.regressions)
    return comparison


# -- the statistics: each quantity compared with its noise, then a verdict -----------------------------------

#: Practical margins when ``--tolerance`` names none, as (absolute, relative to BASE's value): the larger
#: applies. A change smaller than its margin is not worth failing a pull request for, however sure.
DEFAULT_MARGINS: dict[str, tuple[float, float]] = {
    "pass_rate": (0.05, 0.0), "retention": (0.05, 0.0), "case_pass_share": (0.0, 0.0),
    "chrf": (2.0, 0.0), "bleu": (2.0, 0.0), "rouge_l": (0.02, 0.0), "semantic_similarity": (0.02, 0.0),
    "edit_distance": (1.0, 0.0), "likelihood": (0.1, 0.0), "perplexity": (0.0, 0.05), "json_schema": (0.05, 0.0),
    "stops": (0.05, 0.0), "final_loss": (0.05, 0.10), "learnt_at_step": (2.0, 0.10),
    "train_tokens_per_second": (0.0, 0.25), "peak_memory_mb": (0.0, 0.25),
}
#: The recipe's own cost: compared and named always, counted by the gate only with a --tolerance of its own
#: (wall time on a shared CI machine moves more than most regressions do).
COST = ("train_tokens_per_second", "peak_memory_mb")


def margin_for(name: str, base_value: float | None, tolerances: dict[str, tuple[float, float]]) -> float:
    """``mean_chrf`` takes ``chrf``'s margin unless it has its own; absolute or relative, the larger wins."""
    metric = name.split("_", 1)[1] if name.startswith(("mean_", "median_", "change_")) else name
    absolute, relative = tolerances.get(name) or tolerances.get(metric) or DEFAULT_MARGINS.get(
        metric, DEFAULT_MARGINS.get(name, (0.0, 0.0)))
    return max(absolute, relative * abs(base_value) if base_value is not None and math.isfinite(base_value) else 0)


@dataclass
class Quantity:
    """One compared quantity of one case: a Difference (uncertainty.py) and where it belongs."""

    spec: str
    case: str  # the case's name within the spec ("eval[golden]", "expect[0]"), or "" for the spec itself
    difference: Difference
    flipped: list[dict[str, Any]] = field(default_factory=list)  # rows whose pass/fail changed, worst first

    @property
    def label(self) -> str:
        return f"{self.case} {self.difference.name}".strip()


def _seeds_of(report: SpecReport, data: dict | None = None) -> list[Any]:
    seeds = (data or {}).get("seeds") or [s.get("seed") for s in report.extra.get("seeds") or []]
    return seeds or [((report.settings or {}).get("training") or {}).get("seed", "?")]


def _set_seeds(report: SpecReport, data: dict) -> tuple[list[Any], str]:
    """The seeds a set's rows were measured on, and a note when a file cannot give them row by row."""
    seeds = _seeds_of(report, data)
    rows = data.get("rows") or []
    if len(seeds) > 1 and not all(isinstance(r.get("by_seed"), dict) for r in rows):
        return seeds[:1], f"; only seed {seeds[0]}'s rows are in a results file without by_seed"
    return seeds, ""


def _row_values(row: dict, seeds: list[Any], value) -> list[float]:
    """A row's value on each seed: from ``by_seed`` (repeat:), else the row itself (one seed)."""
    by_seed = row.get("by_seed")
    if len(seeds) > 1 and isinstance(by_seed, dict):
        return [value(by_seed.get(str(seed)) or {}) for seed in seeds]
    return [value(row)]


def _score(name: str):
    def get(at: dict) -> float:
        score = (at.get("scores") or {}).get(name)
        return float(score) if isinstance(score, int | float) and not isinstance(score, bool) else math.nan
    return get


def _passed(at: dict) -> float:
    return float(bool(at.get("passed"))) if "passed" in at else math.nan


def _eval_quantities(spec: str, case: str, base_set: dict, head_set: dict, old: SpecReport, new: SpecReport,
                     tolerances: dict) -> list[Quantity]:
    """An eval set in both runs: rows paired by key (by position in a results file without keys), then its
    pass rate (McNemar's test on the flipped rows, seed by seed, as evidence) and each metric's mean."""
    base_rows, head_rows = base_set.get("rows") or [], head_set.get("rows") or []
    (seeds_b, note_b), (seeds_h, note_h) = _set_seeds(old, base_set), _set_seeds(new, head_set)
    keyed = all("key" in r for r in base_rows + head_rows)
    by_head = {(r["key"] if keyed else r.get("index")): r for r in head_rows}
    pairs = [(r, by_head[k]) for r in base_rows if (k := r["key"] if keyed else r.get("index")) in by_head]
    pairing = "rows paired by key" if keyed else "rows paired by position (a results file without row keys)"
    if not pairs:
        return []
    paired_seeds = [str(s) for s in seeds_b] == [str(s) for s in seeds_h]
    out = []
    metrics = list(dict.fromkeys([*(base_set.get("metrics") or []), *(head_set.get("metrics") or [])]))
    for name, value, kind, better in (("pass_rate", _passed, "proportion", True),
                                      *((f"mean_{m}", _score(m), "mean", METRIC_HIGHER_IS_BETTER.get(m, True))
                                        for m in metrics)):
        before = [_row_values(b, seeds_b, value) for b, _ in pairs]
        after = [_row_values(a, seeds_h, value) for _, a in pairs]
        if all(math.isnan(v) for row in before + after for v in row):
            continue
        base_value = float(np.nanmean(before)) if not all(math.isnan(v) for row in before for v in row) else None
        diff = u.compare(name, before, after, seeds_b, seeds_h, margin_for(name, base_value, tolerances), better,
                         kind)
        diff.design += f"; {pairing}{note_b or note_h}"
        if name in ("mean_chrf", "mean_bleu") and paired_seeds and len(seeds_b) == 1:
            diff.evidence["corpus"] = _corpus_test(name[5:], pairs)
        flipped = _flipped(pairs, base_set, seeds_b, seeds_h) if name == "pass_rate" and paired_seeds else []
        out.append(Quantity(spec, case, diff, flipped))
    return out


def _corpus_test(metric: str, pairs: list[tuple[dict, dict]]) -> dict[str, Any] | None:
    """The corpus-level score of both runs' answers and sacrebleu's own paired bootstrap test of the change
    (one seed per side: the answers are the runs'): evidence beside the mean's verdict."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    rows = [(b["answer"], a["answer"], a["reference"]) for b, a in pairs
            if isinstance(b.get("answer"), str) and isinstance(a.get("answer"), str)
            and isinstance(a.get("reference"), str)]
    if len(rows) < 2 or all(b == a for b, a, _ in rows):  # the same answers: no change to test
        return None
    references = [r for _, _, r in rows]
    scorer = CHRF() if metric == "chrf" else BLEU(tokenize="zh" if any(CJK.search(r) for r in references)
                                                  else "13a")
    test = PairedTest([("BASE", [b for b, _, _ in rows]), ("HEAD", [a for _, a, _ in rows])], {metric: scorer},
                      references=[references], test_type="bs", n_samples=1000)
    _, scores = test()
    base, head = next(v for k, v in scores.items() if k != "System")
    # sacrebleu gives numpy floats; JSON wants plain ones. Its p-value is two-sided (a change either way).
    return {"metric": scorer.__class__.__name__, "before": float(base.score), "after": float(head.score),
            "ci": float(head.ci), "p": float(head.p_value),
            "test": "sacrebleu paired bootstrap (1000 resamples, two-sided)"}


def _flipped(pairs: list[tuple[dict, dict]], base_set: dict, seeds_b: list, seeds_h: list) -> list[dict[str, Any]]:
    """Rows (of runs on the same seeds) whose pass share over the seeds crossed one half, passed -> failed
    first, the largest drop of the set's first metric first, with both runs' answers on the first seed."""
    primary = (base_set.get("metrics") or [None])[0]
    sign = 1 if primary is None or METRIC_HIGHER_IS_BETTER.get(primary, True) else -1
    out = []
    for b, a in pairs:
        was, now = (np.nanmean(_row_values(r, seeds, _passed)) for r, seeds in ((b, seeds_b), (a, seeds_h)))
        if math.isnan(was) or math.isnan(now) or (was >= 0.5) == (now >= 0.5):
            continue
        drop = 0.0
        if primary:
            sb, sa = (np.nanmean(_row_values(r, seeds, _score(primary))) for r, seeds in ((b, seeds_b), (a, seeds_h)))
            drop = sign * float(sb - sa) if not (math.isnan(sb) or math.isnan(sa)) else 0.0
        out.append({"key": b.get("key", b.get("index")), "location": a.get("location") or b.get("location", ""),
                    "prompt": a.get("prompt") if a.get("prompt") is not None else a.get("text"),
                    "reference": a.get("reference"), "before": _share(was, len(seeds_b)),
                    "after": _share(now, len(seeds_h)), "answer_before": b.get("answer"),
                    "answer_after": a.get("answer"), "metric": primary, "drop": drop})
    return sorted(out, key=lambda r: (not r["before"].startswith("passed") or r["after"] == "passed", -r["drop"]))


def _share(value: float, seeds: int) -> str:
    return "passed" if value == 1 else "failed" if value == 0 else f"passed on {round(value * seeds)} of {seeds} seeds"


def _per_seed(report: SpecReport, name: str) -> tuple[list[Any], list[Any]]:
    """A spec metric's value on each seed (``repeat:``), else the run's one value and its seed. A diverged
    loss is NaN, whichever way the results file wrote it."""
    seeds = report.extra.get("seeds") or []
    pairs = [(s.get("seed"), s.get(name)) for s in seeds] if seeds else [(_seeds_of(report)[0],
                                                                          report.metrics.get(name))]
    out = []
    for seed, value in pairs:
        if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
            value = float(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out.append((seed, float(value)))
    return [s for s, _ in out], [v for _, v in out]


def _seed_quantities(spec: str, old: SpecReport, new: SpecReport, tolerances: dict) -> list[Quantity]:
    """With ``repeat:`` on both sides: each canary case's share of passing seeds (Fisher's exact test); and
    the final loss and the step it learnt at, seed by seed (a single run is one seed)."""
    out = []
    base_seeds, head_seeds = old.extra.get("seeds") or [], new.extra.get("seeds") or []
    if base_seeds and head_seeds:
        cases = [c.nodeid for c in old.expectations if any(c.nodeid in (s.get("cases") or {}) for s in head_seeds)]
        for nodeid in cases:
            held_b = sum((s.get("cases") or {}).get(nodeid) in HELD for s in base_seeds)
            held_h = sum((s.get("cases") or {}).get(nodeid) in HELD for s in head_seeds)
            nb, nh = len(base_seeds), len(head_seeds)
            share_b, share_h = held_b / nb, held_h / nh
            diff = u.Difference("case_pass_share", u.Estimate(share_b, rows=1, seeds=nb, method="seeds passed"),
                                u.Estimate(share_h, rows=1, seeds=nh, method="seeds passed"),
                                u.Estimate(share_h - share_b, rows=1, seeds=nb + nh, method="Fisher's exact test"),
                                0.0, True, f"passed on {held_b} of {nb} seeds, then {held_h} of {nh}")
            if share_b == share_h:
                diff.verdict, diff.why = "no detectable change", "passed on the same share of seeds"
            else:
                diff.p_worse = u.fisher_worse(held_b, nb, held_h, nh)
                diff.p_better = u.fisher_worse(held_h, nh, held_b, nb)
            out.append(Quantity(spec, _case_name(nodeid, spec), diff))
    for name in ("final_loss", "learnt_at_step", *COST):
        (seeds_b, before), (seeds_h, after) = _per_seed(old, name), _per_seed(new, name)
        if not before or not after:
            continue
        finite_b = [v for v in before if math.isfinite(v)]
        if not finite_b:
            continue
        margin = margin_for(name, float(np.mean(finite_b)), tolerances)
        if not all(math.isfinite(v) for v in after):  # a seed whose loss diverged (NaN, inf)
            out.append(Quantity(spec, "", _diverged(name, before, after, seeds_h, margin)))
        elif len(before) == len(after) == 1 and str(seeds_b[0]) == str(seeds_h[0]):
            out.append(Quantity(spec, "", _point(name, before[0], after[0], seeds_b[0], margin)))
        else:  # one "row" per run, its seeds as columns
            out.append(Quantity(spec, "", u.compare(name, [before], [after], seeds_b, seeds_h, margin,
                                                    not lower_is_better(name))))
    return out


def _diverged(name: str, before: list[float], after: list[float], seeds: list[Any], margin: float) -> Difference:
    bad = [str(s) for s, v in zip(seeds, after, strict=True) if not math.isfinite(v)]
    diff = Difference(name, u.Estimate(float(np.nanmean(before)), rows=1), u.Estimate(math.nan, rows=1),
                      u.Estimate(math.nan, rows=1, method="diverged"), margin, not lower_is_better(name),
                      f"HEAD's {name} is not a number on seed {', '.join(bad)}")
    diff.verdict, diff.why = "worse", f"training diverged in HEAD (seed {', '.join(bad)}): {name} is not a number"
    return diff


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _point(name: str, before: float, after: float, seed: Any, margin: float) -> Difference:
    """One value per side, trained with the same seed: judged on the point against the margin, said so."""
    change = after - before
    worse = -change if lower_is_better(name) else change
    diff = Difference(name, u.Estimate(before, rows=1), u.Estimate(after, rows=1),
                      u.Estimate(change, rows=1, method="one value per side"), margin, not lower_is_better(name),
                      f"one value per side, the same seed ({seed})")
    if worse < -margin:
        diff.verdict = "worse"
    elif worse > margin:
        diff.verdict = "better"
    else:
        diff.verdict = "no detectable change"
    diff.why = (f"{'beyond' if diff.verdict != 'no detectable change' else 'within'} the margin {margin:.3g}, judged "
                "on the point: one run per side has no interval (repeat: gives one)")
    return diff


def _marked(mask) -> str:
    """The first training example with its trained tokens in ⟦ ⟧, as the HTML report's mask view shows them."""
    out, inside = [], False
    for token, trained in zip(mask.tokens, mask.trained, strict=False):
        if trained != inside:
            out.append("⟦" if trained else "⟧")
            inside = trained
        out.append(token)
    return "".join(out) + ("⟧" if inside else "")


def mask_causes(base, head) -> list[str]:
    """Whether the tokens and labels of the training examples changed between the runs (a collator or a
    chat template change: the silent failure of TRL #5138), and the first changed conversation as a token
    diff with its trained tokens marked."""
    if base is None or head is None or not base.fingerprint or not head.fingerprint:
        return []
    if not all(isinstance(m.tokens, list) and isinstance(m.trained, list) and isinstance(m.example_fingerprints, list)
               for m in (base, head)):
        return ["likely cause: the loss mask changed (a results file's mask summary is malformed: no detail)"]
    if base.fingerprint == head.fingerprint and base.examples == head.examples:
        return []
    pairs = list(zip(base.example_fingerprints, head.example_fingerprints, strict=False))
    changed = [i for i, (a, b) in enumerate(pairs) if a != b]
    text = base.text_fingerprint and head.text_fingerprint and base.text_fingerprint != head.text_fingerprint
    where = (f"{len(changed)} of the first {len(pairs)} training conversations differ in their tokens or labels"
             if pairs else "the training conversations differ in their tokens or labels")
    lines = [f"likely cause: the loss mask changed: {where}"
             + (f" (BASE has {base.examples} conversations, HEAD {head.examples})" if base.examples != head.examples
                else "") + "; the rendered text " + ("changed too (the chat template or the formatting)" if text
                                                     else "did not change (the collator: which tokens carry the "
                                                     "loss)")]
    if (not changed or changed[0] == 0) and base.tokens and head.tokens:
        lines.append(f"first conversation, trained tokens in ⟦ ⟧: {char_diff(_marked(base), _marked(head))}   "
                     "([-BASE-] {+HEAD+})")
        lines.append(f"trained text: {base.trained_text!r} -> {head.trained_text!r}")
    elif changed:
        lines.append(f"the first changed conversation is number {changed[0] + 1}: the reports' mask views show "
                     "the first conversation only")
    return lines


def _regressions(comparison: Comparison) -> list[str]:
    """What --fail-on-regression counts, each as one line that names it and its evidence."""
    out = []
    for spec in comparison.specs:
        gone = spec.before not in (None, *MUTED) and (spec.after in (None, *MUTED) or (
            spec.before != "xfailed" and spec.after == "xfailed"))
        if gone and not comparison.allowed(spec.nodeid):  # deleting, skipping or xfailing a check fixes nothing
            out.append(f"{spec.nodeid}: {spec.before} -> {removal(spec)} (--allow-removed {spec.nodeid} if on "
                       "purpose)")
        if spec.before is None and spec.after in BROKEN:
            out.append(f"{spec.nodeid}: new in HEAD, and {spec.after}")
        if spec.before in HELD and spec.after in BROKEN and not any(c.broke for c in spec.cases):
            out.append(f"{spec.nodeid}: {spec.before} -> {spec.after}")
        for case in spec.cases:
            case_id = f"{spec.nodeid}::{case.name}"
            if spec.after not in (None, *MUTED) and case.before not in (None, *MUTED) and (
                    case.after is None or (case.before != "xfailed" and case.after == "xfailed")) \
                    and not comparison.allowed(case_id):  # a check of a spec that stays, deleted or xfailed
                shown = "removed (its checks no longer run)" if case.after is None else "xfailed (now expected to fail)"
                out.append(f"{case_id}: {case.before} -> {shown} (--allow-removed '{case_id}' if on purpose)")
            if case.regressed:
                out.append(f"{spec.nodeid}::{case.name}: {case.before} -> {case.after}")
            elif case.broke and comparison.fail_on_inconclusive:
                out.append(f"{spec.nodeid}::{case.name}: {case.before} -> {case.after} (inconclusive)")
    failing = ("worse", "inconclusive") if comparison.fail_on_inconclusive else ("worse",)
    for q in comparison.quantities:
        if not counts(comparison, q):
            continue  # named, not counted: see COST
        if q.difference.verdict in failing:
            out.append(f"{q.spec}{'::' + q.case if q.case else ''}: {q.difference.name} {_summary(q.difference)}")
    return out


def counts(comparison: Comparison, q: Quantity) -> bool:
    """Whether the gate may count this quantity: a cost (throughput, memory) only with a tolerance of its own."""
    return not (q.difference.name in COST and q.difference.name not in comparison.tolerances)


def _summary(d: Difference) -> str:
    """``0.85 -> 0.525, -0.325 ± 0.11 (95%: -0.55 to -0.10): worse (p = 0.003 after Holm over 4)``"""
    return (f"{u._fmt(d.before.value, 4)} -> {u._fmt(d.after.value, 4)}, difference {d.diff.text()}: "
            f"{d.verdict.upper() if d.verdict == 'worse' else d.verdict} ({d.why})")


# -- one comparison, four renderings: the same findings in the terminal, Markdown, HTML and JSON -------------


@dataclass
class Finding:
    """One line of evidence about a spec: what kind it is, its text, and whether the gate counts it."""

    kind: str  # transition, case, answer, diff, quantity, design, settle, row, settings, error
    text: str
    counted: bool = False
    detail: dict[str, Any] = field(default_factory=dict)


#: Flipped rows shown per quantity (the JSON lists every one).
SHOWN_ROWS = 5


def _shown(spec: SpecChange, comparison: Comparison, verbose: bool) -> bool:
    quantities = comparison.verdicts(spec.nodeid)
    return verbose or spec.transition != "unchanged" or bool(spec.causes) or any(
        q.difference.verdict != "no detectable change" for q in quantities)


def findings(comparison: Comparison, verbose: bool = False) -> list[tuple[SpecChange, list[Finding]]]:
    """Each spec worth showing (changed, or with a quantity that is not "no detectable change"; every spec
    with ``verbose``), regressions first, with its evidence in the order a reviewer reads it."""
    counted = set(comparison.regressions)
    out = []
    for spec in comparison.specs:
        if not _shown(spec, comparison, verbose):
            continue
        counted_spec = any(r.startswith(f"{spec.nodeid}: ") for r in counted)
        items = [Finding("transition", f"{spec.nodeid}: {spec.before or 'new'} -> {spec.after or 'removed'} ("
                         + ("REGRESSION" if spec.label == "regressed" else spec.label) + ")", counted_spec)]
        if spec.error_after:
            items.append(Finding("error", f"error: {spec.error_after.splitlines()[0]}"))
        items += [Finding("cause", line) for line in spec.causes]
        for case in spec.cases:
            if case.before == case.after and not case.answer_changed and not verbose:
                continue
            counted_case = case.regressed or (case.broke and comparison.fail_on_inconclusive) or any(
                r.startswith(f"{spec.nodeid}::{case.name}: ") for r in counted)
            after = case.after or ("removed (its checks no longer run)" if case.before else "removed")
            after = "xfailed (now expected to fail)" if after == "xfailed" and case.before not in (None, "xfailed") \
                else after
            items.append(Finding("case", f"{case.name}: {case.before or 'new'} -> {after}"
                                 + (" (inconclusive: its interval straddles the threshold)" if case.inconclusive
                                    else ""), counted_case))
            if case.answer_changed:
                items.append(Finding("answer", f"answer: {case.answer_before} -> {case.answer_after}"))
                items.append(Finding("diff", f"diff:   {case.diff}   ([-BASE-] {{+HEAD+}})"))
        for q in comparison.verdicts(spec.nodeid):
            d = q.difference
            if d.verdict == "no detectable change" and not verbose and d.diff.method == "identical":
                continue
            line = f"{q.spec + '::' + q.case if q.case else q.spec}: {d.name} {_summary(d)}"
            uncounted = "" if counts(comparison, q) or d.verdict not in ("worse", "inconclusive") else \
                f"; named, not counted: --tolerance {d.name}=AMOUNT gates it"
            items.append(Finding("quantity", f"{q.label}: {_summary(d)}{uncounted}", line in counted, d.to_dict()))
            items.append(Finding("design", f"how: {d.design}" + _evidence_text(d)))
            if d.settle:
                items.append(Finding("settle", f"to settle it: {d.settle}"))
            for row in q.flipped[:SHOWN_ROWS]:
                items.append(Finding("row", f"row {row['key']} ({row['location']}): {row['before']} -> "
                                     f"{row['after']}; answer {row['answer_before']!r} -> {row['answer_after']!r}",
                                     detail=row))
            if len(q.flipped) > SHOWN_ROWS:
                items.append(Finding("row", f"... and {len(q.flipped) - SHOWN_ROWS} more rows flipped (every one "
                                     "in compare --json)"))
        if spec.settings:
            items.append(Finding("settings", "settings: " + ", ".join(f"{k} {a} -> {b}" for k, a, b in spec.settings)))
        out.append((spec, items))
    def order(pair) -> int:  # removals first (a deleted check hides what it would have said), then regressions
        spec, items = pair
        return 0 if items[0].counted and spec.after in (None, *MUTED, "xfailed") else 1 if any(
            f.counted for f in items) else 2

    return sorted(out, key=order)


def _evidence_text(d: Difference) -> str:
    text = ""
    for test in d.evidence.get("mcnemar") or []:
        text += (f"; McNemar's exact test on seed {test['seed']}: {test['passed_to_failed']} rows passed -> "
                 f"failed, {test['failed_to_passed']} failed -> passed, p = {test['p']:.3g}")
    if bootstrap := d.evidence.get("paired_bootstrap"):
        text += f"; paired bootstrap 95%: {bootstrap[0]:.3g} to {bootstrap[1]:.3g}"
    if corpus := d.evidence.get("corpus"):
        text += (f"; corpus {corpus['metric']} {corpus['before']:.4g} -> {corpus['after']:.4g} (± {corpus['ci']:.3g}), "
                 f"p = {corpus['p']:.3g} ({corpus['test']})")
    return text


def _commit(meta: dict) -> str:
    git = meta.get("git") if isinstance(meta.get("git"), dict) else {}
    commit = str(git.get("commit") or "")[:10]
    return f" (commit {commit}{', with uncommitted changes' if git.get('dirty') else ''})" if commit else ""


def _header(comparison: Comparison) -> list[str]:
    base, head = comparison.base, comparison.head
    lines = [f"BASE: {base.get('created', '?')} {' '.join(base.get('command', []))}{_commit(base)}",
             f"HEAD: {head.get('created', '?')} {' '.join(head.get('command', []))}{_commit(head)}",
             *(f"note: {note}" for note in comparison.notes)]
    if comparison.versions:
        lines.append("library versions differ (a likely cause of what changed): "
                     + ", ".join(f"{k} {a} -> {b}" for k, a, b in comparison.versions))
    return lines


def _counts(comparison: Comparison) -> str:
    counts = {t: comparison.count(t) for t in ("regressed", "fixed", "changed", "new", "removed", "unchanged")}
    verdicts = {v: sum(q.difference.verdict == v for q in comparison.quantities)
                for v in ("worse", "better", "no detectable change", "inconclusive")}
    text = ", ".join(f"{n} {t}" for t, n in counts.items())
    if comparison.quantities:
        text += "; quantities: " + ", ".join(f"{n} {v}" for v, n in verdicts.items())
    return text


INDENT = {"transition": "", "error": "    ", "cause": "    ", "case": "    ", "answer": "        ", "diff": "        ",
          "quantity": "    ", "design": "        ", "settle": "        ", "row": "        ", "settings": "    "}


def text_lines(comparison: Comparison, verbose: bool = False) -> list[str]:
    """The comparison for a terminal or a log, every line escaped."""
    lines = _header(comparison)
    for _, items in findings(comparison, verbose):
        lines += [INDENT[f.kind] + f.text for f in items]
    lines.append(_counts(comparison))
    if comparison.regressions:
        lines.append(f"{comparison.headline()}: " + "; ".join(comparison.regressions))
    return [safe(line) for line in lines]


def comparison_markdown(comparison: Comparison, heading: str = "##") -> str:
    """The same findings as the terminal, for a pull request: a table of what the gate counts, then each
    spec's evidence in a code block."""
    lines = [f"{heading} sft-spec compare: {comparison.headline()}", "",
             md_text(_counts(comparison)), ""]
    if comparison.versions:
        lines += ["Library versions differ (a likely cause): " + md_text(
            ", ".join(f"{k} {a} -> {b}" for k, a, b in comparison.versions)), ""]
    lines += [f"> note: {md_text(note)}\n" for note in comparison.notes]
    if comparison.regressions:
        lines += ["| counted by the gate |", "| --- |", *(f"| {md_text(r)} |" for r in comparison.regressions), ""]
    for spec, items in findings(comparison):
        lines += [f"**{md_text(spec.nodeid)}**: {md_text(spec.before or 'new')} -> {md_text(spec.after or 'removed')} "
                  f"({'**regression**' if spec.label == 'regressed' else md_text(spec.label)})", "",
                  md_code("\n".join(INDENT[f.kind] + f.text for f in items[1:]) or "(no details)"), ""]
    return "\n".join(lines) + "\n"


def comparison_json(comparison: Comparison) -> dict[str, Any]:
    """``compare --json``: the findings and every quantity with its statistics (schemas/compare.schema.json)."""
    return {
        "compare_version": 1,
        "base": {k: comparison.base.get(k) for k in ("created", "command", "rootdir")},
        "head": {k: comparison.head.get(k) for k in ("created", "command", "rootdir")},
        "versions": [{"package": k, "base": a, "head": b} for k, a, b in comparison.versions],
        "alpha": comparison.alpha,
        "notes": comparison.notes,
        "regressions": comparison.regressions,
        "counts": _counts(comparison),
        "specs": [{"nodeid": spec.nodeid, "base": spec.before, "head": spec.after, "transition": spec.label,
                   "findings": [{"kind": f.kind, "text": f.text, "counted": f.counted, **(
                       {"detail": f.detail} if f.detail else {})} for f in items]}
                  for spec, items in findings(comparison, verbose=True)],
        "quantities": [{"spec": q.spec, "case": q.case, **q.difference.to_dict(), "flipped": q.flipped}
                       for q in comparison.quantities],
    }


# -- the command ---------------------------------------------------------------------------------------


_TOLERANCE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*([0-9.eE+-]+)\s*(%?)\s*$")


def parse_tolerances(values: list[str]) -> dict[str, tuple[float, float]]:
    """``NAME=AMOUNT`` (absolute) or ``NAME=AMOUNT%`` (of BASE's value): (absolute, relative)."""
    out = {}
    for value in values or []:
        match = _TOLERANCE.match(value)
        try:
            amount = float(match.group(2)) if match else math.nan
        except ValueError:
            amount = math.nan
        if not match or not math.isfinite(amount) or amount < 0:
            raise UsageError(f"--tolerance {value!r}: expected NAME=AMOUNT or NAME=PERCENT%, a finite amount of 0 "
                             "or more (final_loss=0.05, chrf=2, pass_rate=0.05, perplexity=5%)")
        out[match.group(1)] = (0.0, amount / 100) if match.group(3) else (amount, 0.0)
    return out


def check_tolerance_names(tolerances: dict[str, Any], comparison: Comparison) -> None:
    """Every --tolerance names a quantity of the two runs (``chrf`` covers ``mean_chrf``): a typo would gate
    nothing in silence."""
    names = {q.difference.name for q in comparison.quantities}
    names |= {n.split("_", 1)[1] for n in names if n.startswith(("mean_", "median_"))}
    for name in tolerances:
        if name not in names:
            raise UsageError(f"--tolerance: {did_you_mean(name, names, 'quantity')} (the quantities these two runs "
                             "have; see docs/gate.md)")


def _arguments(parser) -> None:
    parser.add_argument("base", type=Path, metavar="BASE.json", help="results of the run to compare against (main)")
    parser.add_argument("head", type=Path, metavar="HEAD.json", help="results of the run to review (the change)")
    parser.add_argument("--fail-on-regression", action="store_true",
                        help="exit 1 when a check that passed in BASE fails in HEAD, or a quantity is worse by more "
                        "than its margin (after Holm's correction, at --alpha)")
    parser.add_argument("--fail-on-inconclusive", action="store_true",
                        help="with --fail-on-regression, exit 1 on an inconclusive quantity too")
    parser.add_argument("--allow-removed", action="append", default=[], metavar="ID",
                        help="a spec id (or a glob) that HEAD removed or skipped on purpose: not counted as a "
                        "regression")
    parser.add_argument("--alpha", type=float, default=0.05, metavar="LEVEL",
                        help="the family-wise error rate of the verdicts (default 0.05)")
    parser.add_argument("--tolerance", action="append", default=[], metavar="NAME=AMOUNT",
                        help="a quantity's practical margin: how much worse it may get (pass_rate=0.05, chrf=2, "
                        "final_loss=0.05, perplexity=5%%); defaults in docs/gate.md")
    parser.add_argument("--html", dest="html_path", type=output_path, metavar="PATH",
                        help="write the comparison as HTML")
    parser.add_argument("--md", dest="md_path", type=output_path, metavar="PATH",
                        help="write the comparison as Markdown (a CI summary)")
    parser.add_argument("--json", dest="json_path", type=output_path, metavar="PATH",
                        help="write the comparison as JSON (schemas/compare.schema.json)")
    parser.add_argument("-v", "--verbose", action="store_true", help="list unchanged specs and checks too")


def _run(options, pluginmanager) -> int:
    from ..common.files import atomic_write_text
    from .json_report import dumps, load_document

    if not 0 < options.alpha < 1:
        raise UsageError(f"--alpha {options.alpha}: expected a level between 0 and 1, e.g. 0.05")
    tolerances = parse_tolerances(options.tolerance)
    base_meta, base = load_document(options.base)
    head_meta, head = load_document(options.head)
    comparison = compare_reports(base_meta, base, head_meta, head, tolerances, options.alpha,
                                 options.fail_on_inconclusive, options.allow_removed)
    check_tolerance_names(tolerances, comparison)
    for line in text_lines(comparison, options.verbose):
        print(line)
    if options.html_path:
        from .compare_html import render_comparison

        atomic_write_text(options.html_path, render_comparison(comparison, findings(comparison), INDENT,
                                                               _header(comparison)))
        print(f"comparison HTML: {options.html_path}")
    if options.md_path:
        atomic_write_text(options.md_path, comparison_markdown(comparison))
        print(f"comparison Markdown: {options.md_path}")
    if options.json_path:
        atomic_write_text(options.json_path, dumps(comparison_json(comparison)))
        print(f"comparison JSON: {options.json_path}")
    return 1 if options.fail_on_regression and comparison.regressions else 0


@hookimpl
def sft_spec_register_commands(register):
    register("compare", "compare two results files (BASE and HEAD): transitions, answer diffs, each quantity with "
             "its noise and a verdict", _arguments, _run)
