"""Report objects: what a spec run produced, in a form every reporter (terminal, JSON, JUnit, HTML) reads.

Reports are plain dataclasses so that they serialise to JSON and back (``sft-spec report`` re-renders
from a results file without training).
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Outcome = Literal["passed", "failed", "error", "skipped", "xfailed", "xpassed", "interrupted", "deselected"]


#: The check a strict expectation-level ``xfail`` adds when its checks pass: the case fails, XPASS(strict).
XPASS_STRICT = "xfail_strict"


@dataclass
class CheckReport:
    name: str
    argument: Any
    passed: bool
    message: str = ""
    on: Literal["after", "before"] = "after"
    expected: str | None = None


@dataclass
class ExpectationReport:
    nodeid: str
    index: int
    prompt: list[dict]
    answer: str | None = None
    raw_answer: str | None = None
    base_answer: str | None = None
    checks: list[CheckReport] = field(default_factory=list)
    outcome: Outcome = "passed"
    location: str = ""
    xfail_reason: str = ""  # an expectation's own xfail (a spec's is on the SpecReport)

    @property
    def failed_checks(self) -> list[CheckReport]:
        return [c for c in self.checks if not c.passed]


@dataclass
class ErrorInfo:
    message: str
    location: str = ""
    phase: str = ""
    plugin: str = ""
    traceback: str = ""
    kind: str = "error"  # error | interrupted | timeout | oom | nan


@dataclass
class MaskSummary:
    """Which tokens of the first training example carry the loss, for review."""

    tokens: list[str] = field(default_factory=list)
    trained: list[bool] = field(default_factory=list)
    trained_text: str = ""
    examples: int = 0
    trained_tokens: int = 0
    total_tokens: int = 0


@dataclass
class SpecReport:
    nodeid: str
    path: str
    name: str
    variant: str | None
    outcome: Outcome
    duration: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    expectations: list[ExpectationReport] = field(default_factory=list)
    training_checks: list[ExpectationReport] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    mask: MaskSummary | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: ErrorInfo | None = None
    skip_reason: str = ""
    xfail_reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    model: str = ""
    method: str = ""

    @property
    def cases(self) -> list[ExpectationReport]:
        """The test cases of this spec: expectations, then training-level checks."""
        return self.expectations + self.training_checks

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def char_diff(expected: str, actual: str) -> str:
    """Inline character-level diff: ``我学会[-了-]{+吗+}``. Right for text without spaces (CJK)."""
    out = []
    matcher = difflib.SequenceMatcher(a=expected, b=actual, autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            out.append(expected[a0:a1])
        if op in ("delete", "replace"):
            out.append(f"[-{expected[a0:a1]}-]")
        if op in ("insert", "replace"):
            out.append(f"{{+{actual[b0:b1]}+}}")
    return "".join(out)


def diff_segments(expected: str, actual: str) -> list[tuple[str, str]]:
    """``[(op, text)]`` with op in equal/delete/insert, for reporters that colour a diff."""
    segments = []
    matcher = difflib.SequenceMatcher(a=expected, b=actual, autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            segments.append(("equal", expected[a0:a1]))
        if op in ("delete", "replace"):
            segments.append(("delete", expected[a0:a1]))
        if op in ("insert", "replace"):
            segments.append(("insert", actual[b0:b1]))
    return segments
