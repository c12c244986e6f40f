"""``repeat: {seeds: [1, 2, 3], pass_rate: 0.67}``: train and check the spec once per seed, and decide each
case on the share of seeds on which its checks held.

A recipe that passes on one seed and fails on the next is flaky, and a single run cannot tell: GPU
nondeterminism and a greedy answer that flips on one token are common complaints. Each seed is a whole
run of the spec (``training.seed`` set to it); the report keeps every seed's outcome and loss curve
(``extra["seeds"]``), and each case gets a ``repeat`` check that says on which seeds it passed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sft_spec import hookimpl
from sft_spec.errors import SpecTimeout
from sft_spec.registry import SpecSection
from sft_spec.reports import CheckReport, ErrorInfo, ExpectationReport, SpecReport, new_report

from ..check.eval_sets import combine_seed_reports
from ..common.uncertainty import Estimate
from .protocol import apply_xfail, spec_outcome


class RepeatSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seeds: list[int] = Field(description="One training per seed (training.seed), e.g. [1, 2, 3]")
    pass_rate: float = Field(1.0, ge=0, le=1, allow_inf_nan=False, description="Share of seeds on which a case "
                             "must pass, as a count of seeds rounded up (0.5 of 1 seed: 1; 0.67 of 3 seeds: 2)")

    @property
    def needed(self) -> int:
        """Seeds a case must pass on: the share as a count, rounded up, so a share above zero never needs no
        seed (0.5 of 1 is 1). Rounded to a tenth of a seed first, so 0.67 (or 0.66) of 3 is 2, as written."""
        return math.ceil(round(self.pass_rate * len(self.seeds), 1))

    @field_validator("seeds", mode="before")
    @classmethod
    def _integers(cls, value: Any) -> Any:
        """Seeds are whole numbers from 0 up: ``true`` is not seed 1, -1 is not a seed torch accepts."""
        if isinstance(value, list) and any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
            raise ValueError(f"seeds: expected whole numbers from 0 up, got {value}")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("seeds: expected at least one seed")
        if len(set(value)) != len(value):
            raise ValueError(f"seeds: each seed once, got {value}")
        return value


REPEAT = SpecSection("repeat", RepeatSpec, "Train and check once per seed; decide on the share that passed")


@hookimpl
def sft_spec_register_spec_sections(register) -> None:
    register(REPEAT)


def seeded(item, seed: int):
    """The item as one seed's run: ``training.seed`` set, the repeat section taken away."""
    spec = item.spec.model_copy(deep=True)
    spec.training["seed"] = seed
    sections = {k: v for k, v in item.sections.items() if k != REPEAT.name}
    return dataclasses.replace(item, spec=spec, sections=sections, notes=list(item.notes))


@hookimpl(tryfirst=True)
def sft_spec_run_spec(item, session) -> SpecReport | None:
    repeat = item.section(REPEAT)
    if repeat is None or item.spec.skip:
        return None
    runs = []
    for seed in repeat.seeds:
        try:
            report = session.config.hook.sft_spec_run_spec(item=seeded(item, seed), session=session)
        except SpecTimeout as exc:  # the time ran out between two seeds
            report = new_report(item)
            report.outcome = "error"
            report.error = ErrorInfo(f"timed out: {exc}", location=str(item.location), kind="timeout")
        runs.append((seed, report))
        if report.outcome == "interrupted":
            return report
        if report.error is not None and report.error.kind == "timeout":  # --timeout bounds the spec, not a seed
            report.error.message += f" (at seed {seed}; seeds run: {', '.join(str(s) for s, _ in runs)} " \
                                    f"of {len(repeat.seeds)})"
            return report
    return combine(item, repeat, runs)


def _case(report: SpecReport, nodeid: str) -> ExpectationReport | None:
    return next((c for c in report.cases if c.nodeid == nodeid), None)


def _raw_passed(case: ExpectationReport | None) -> bool:
    """Whether the case's own checks held on one seed, before its xfail was applied."""
    return case is not None and all(c.passed for c in case.checks if c.name != "xfail_strict")


def combine(item, repeat: RepeatSpec, runs: list[tuple[int, SpecReport]]) -> SpecReport:
    ran = [(seed, r) for seed, r in runs if r.outcome not in ("error", "skipped")]
    if not ran:  # every seed errored: the first error is the story
        report = runs[0][1]
        report.notes.append(f"repeat: every seed ({', '.join(map(str, repeat.seeds))}) ended in {report.outcome}")
        return report
    report = copy.deepcopy(ran[0][1])
    report.extra["seeds"] = [{
        "seed": seed, "outcome": r.outcome, "losses": list(r.losses),
        "final_loss": r.losses[-1] if r.losses else None, "learnt_at_step": r.metrics.get("learnt_at_step"),
        **{k: r.metrics.get(k) for k in ("train_tokens_per_second", "peak_memory_mb")},
        "cases": {c.nodeid: c.outcome for c in r.cases},
        "error": r.error.message if r.error else None,
    } for seed, r in runs]
    report.duration = sum(r.duration for _, r in runs)
    for _, r in runs[1:]:
        report.notes.extend(n for n in r.notes if n not in report.notes)
    needed = repeat.needed
    xfails = {c.nodeid: c.xfail for c in item.cases}
    for kind in ("expectations", "training_checks"):
        combined = []
        for case in getattr(report, kind):
            held = [seed for seed, r in runs if _raw_passed(_case(r, case.nodeid))]
            share, ok = len(held) / len(runs), len(held) >= needed
            # The checks shown are from a seed on which the case failed, if one did: what to look at.
            failing = next((c for _, r in ran if (c := _case(r, case.nodeid)) and not _raw_passed(c)), None)
            shown = copy.deepcopy(failing or case)
            shown.checks = [c for c in shown.checks if c.name != "xfail_strict"]
            shown.outcome = "passed" if ok else "failed"
            shown.checks.append(CheckReport("repeat", {"seeds": repeat.seeds, "pass_rate": repeat.pass_rate},
                                            ok, _summary(held, repeat), score=share))
            combined.append(apply_xfail(shown, xfails.get(case.nodeid) or item.spec.xfail))
        setattr(report, kind, combined)
    sets = {nodeid for _, r in ran for nodeid in r.eval_sets}
    if sets:  # every seed's rows, and each aggregate's interval clustered by row and seed
        report.eval_sets = {nodeid: combine_seed_reports([(seed, r.eval_sets[nodeid]) for seed, r in ran
                                                          if nodeid in r.eval_sets])
                            for nodeid in sorted(sets)}
        for data in report.eval_sets.values():
            pooled = "; ".join(f"{name} {Estimate.from_dict(e).text()}" for name, e in data["uncertainty"].items())
            report.notes.append(f"eval[{data['name']}] over {len(data['seeds'])} seeds: {pooled}")
    report.outcome = spec_outcome(item, report)
    report.metrics["seeds"] = len(runs)
    report.metrics["seeds_passed"] = sum(r.outcome == "passed" for _, r in runs)
    return report


def _summary(held: list[int], repeat: RepeatSpec) -> str:
    shown = f" ({', '.join(map(str, held))})" if held else ""
    return (f"passed on {len(held)} of {len(repeat.seeds)} seeds{shown}; needs {repeat.needed} "
            f"(pass_rate {repeat.pass_rate:g})")


def _settings_note(item) -> list[str]:
    repeat = item.section(REPEAT)
    if repeat is not None and "seed" in item.spec.training:
        return [f"{item.locate('training', 'seed')}: note: repeat sets training.seed to each of "
                f"{', '.join(map(str, repeat.seeds))}; the spec's seed {item.spec.training['seed']} is not used"]
    return []


@hookimpl
def sft_spec_validate_spec(item, config) -> list[Any]:
    item.notes.extend(_settings_note(item))
    return []
