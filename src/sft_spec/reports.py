"""Report objects, read by every reporter; plain dataclasses, so they go to JSON and back (``sft-spec
report``, and workers sending theirs to the main process: :func:`report_to_dict`, :func:`report_from_dict`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, TypedDict

if TYPE_CHECKING:
    from .state import SpecItem

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
    score: float | None = None


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
    stopped: bool | None = None  # the answer ended its turn (False: cut at max_new_tokens)
    max_new_tokens: int | None = None

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
    count: int = 1  # located errors in ``message``, one per line (a spec file's collection reports them all)


@dataclass
class MaskSummary:
    """Which tokens of the first training example carry the loss, for review."""

    tokens: list[str] = field(default_factory=list)
    trained: list[bool] = field(default_factory=list)
    trained_text: str = ""
    examples: int = 0
    trained_tokens: int = 0
    total_tokens: int = 0
    #: What decides what the model is taught, fingerprinted, so compare can name a change as its likely cause:
    #: every example's token ids and labels, their rendered text, and each example's own (the first 1,000).
    fingerprint: str = ""
    text_fingerprint: str = ""
    example_fingerprints: list[str] = field(default_factory=list)


class EvalSetData(TypedDict, total=False):
    """One eval set's report (results.schema.json's ``eval_set``)."""

    name: str
    metrics: list[str]  # the metrics it computes, the primary first
    aggregates: dict[str, float]
    uncertainty: dict[str, Any]  # each aggregate's interval
    seeds: list[dict[str, Any]]  # ``repeat:``: each seed's aggregates
    verdict: Any  # the gate's, per aggregate
    rows: list[dict[str, Any]]  # worst first


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
    #: What plugins add for the main process (a loss baseline's fingerprint, ...), JSON-serialisable.
    extra: dict[str, Any] = field(default_factory=dict)
    #: Reused from the result cache: nothing ran (``metrics["cached_duration"]`` is the run it reuses).
    cached: bool = False
    #: Each eval set's report by its case's node id (rows worst first, aggregates with their intervals, the
    #: gate's verdict): what compare, history, the HTML report and ``repeat:`` read.
    eval_sets: dict[str, EvalSetData] = field(default_factory=dict)

    @property
    def cases(self) -> list[ExpectationReport]:
        """The test cases of this spec: expectations, then training-level checks."""
        return self.expectations + self.training_checks

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_report(item: SpecItem, outcome: Outcome = "passed") -> SpecReport:
    """An empty report for ``item``: what every protocol (in process, launched, remote) starts from."""
    spec = item.spec
    return SpecReport(
        nodeid=item.nodeid, path=str(item.location.path), name=item.name, variant=item.variant, outcome=outcome,
        tags=list(spec.tags), model=spec.model.id, method=spec.method, notes=list(item.notes),
        xfail_reason=spec.xfail.reason if spec.xfail else "",
    )


def report_to_dict(report: SpecReport) -> dict[str, Any]:  # the inverse of report_from_dict
    return report.to_dict()


def _build(cls, data: dict[str, Any]):
    """A dataclass from its dict, ignoring keys a newer writer added (forward compatible within a version)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def report_from_dict(data: dict[str, Any]) -> SpecReport:
    """The inverse of :func:`report_to_dict`; raises TypeError/KeyError on malformed data."""

    def case(d: dict[str, Any]) -> ExpectationReport:
        exp = _build(ExpectationReport, d)
        exp.checks = [_build(CheckReport, c) for c in d.get("checks", [])]
        return exp

    report = _build(SpecReport, data)
    report.expectations = [case(e) for e in data.get("expectations", [])]
    report.training_checks = [case(e) for e in data.get("training_checks", [])]
    report.mask = _build(MaskSummary, data["mask"]) if data.get("mask") else None
    report.error = _build(ErrorInfo, data["error"]) if data.get("error") else None
    if "eval_sets" not in data and isinstance(data.get("extra"), dict) and "eval" in data["extra"]:
        report.extra = dict(report.extra)
        report.eval_sets = report.extra.pop("eval") or {}  # written before eval_sets had a field of its own
    if "cached" not in data and isinstance(data.get("metrics"), dict) and "cached" in data["metrics"]:
        report.metrics = dict(report.metrics)
        report.cached = bool(report.metrics.pop("cached"))
    return report
