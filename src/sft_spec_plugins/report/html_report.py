"""``--html PATH``: one self-contained HTML file for reviewing a run (works offline, no external assets).

For each spec it shows the training data as the model saw it (loss-carrying tokens highlighted), the
loss curve, and every expectation with the answers before and after training and a character diff.
Everything that comes from specs, data or the model is escaped by jinja2's autoescape, control characters
shown as ``\x1b`` (``escape.safe``); the page's
Content-Security-Policy forbids loading anything from outside.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from sft_spec import hookimpl
from sft_spec.reports import ExpectationReport, SpecReport

from ..common.escape import safe
from ..common.files import output_path
from .failures import diff_segments, shown_argument
from .report_files import FileReporter, case_outcome_counts, logged_every

OUTCOME_ORDER = ("failed", "error", "interrupted", "xpassed", "passed", "xfailed", "skipped")
PHASE_LABELS = {"import": "import libraries", "load": "load model", "generate_before": "generate before",
                "format": "format", "mask": "mask", "train": "train", "generate": "generate", "check": "check"}

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")


def visible(text: Any) -> str:
    """Control characters (random models emit them) as Unicode pictures: shown, never breaking the page."""
    if text is None:
        return ""
    return _CONTROL.sub(lambda m: "\u2421" if m.group() == "\x7f" else chr(0x2400 + ord(m.group())),
                        str(text))


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def flatten(settings: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(flatten(value, name + "."))
        else:
            rows.append((name, value if isinstance(value, str) else _json(value)))
    return rows


# -- the training text as the model saw it ----------------------------------------------------------


@dataclass
class TokenView:
    text: str
    title: str


@dataclass
class TokenRun:
    """Consecutive tokens with the same loss flag: one highlighted (or dimmed) stretch of text."""

    trained: bool
    tokens: list[TokenView] = field(default_factory=list)


def token_runs(tokens: list[str], trained: list[bool]) -> list[TokenRun]:
    """Tokens grouped for display; "" tokens are bytes of a character that the next token completes
    (see ``sft_spec_plugins.run.protocol.decode_tokens``), so they join it and its hover text names them all."""
    runs: list[TokenRun] = []
    start = 0
    for i, text in enumerate(tokens):
        if text == "" and i + 1 < len(tokens):
            continue
        flags = trained[start:i + 1]
        on = any(flags)
        where = (f"token {i}" if start == i
                 else f"tokens {start}-{i} (one character, {i - start + 1} byte tokens)")
        state = "carries the loss" if all(flags) else ("partly carries the loss" if on else "no loss")
        view = TokenView(text=visible(text).replace("\n", "\u21b5\n"), title=f"{where}: {text!r}, {state}")
        if not runs or runs[-1].trained != on:
            runs.append(TokenRun(trained=on))
        runs[-1].tokens.append(view)
        start = i + 1
    return runs


# -- the loss chart ---------------------------------------------------------------------------------


@dataclass
class Chart:
    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    log: bool
    points: list[tuple[float, float, int, str]]  # x, y, step, value
    polyline: str
    yticks: list[tuple[float, str]]
    xticks: list[tuple[float, str]]
    overlay: str = ""  # a second curve on the same axes (the loss baseline, or BASE's curve in a comparison)


def _nice_step(span: float, count: int = 5) -> float:
    raw = span / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _finite_steps(losses: list[float]) -> list[tuple[int, float]]:
    # A NaN or inf step (a diverged run) has no place on the axis: it is left out, the others keep their step.
    return [(i, float(v)) for i, v in enumerate(losses) if isinstance(v, (int, float)) and math.isfinite(v)]


#: The loss chart's y axis, as powers of ten: the same in every report unless a loss falls outside it.
LOSS_AXIS = (-2, 1)


def loss_chart(losses: list[float], overlay: list[float] | None = None, every: int = 1) -> Chart | None:
    """The loss per logged step; ``every``: optimizer steps between two logged losses, so the x axis counts
    the run's real steps."""
    steps, other = _finite_steps(losses), _finite_steps(overlay or [])
    if not steps:
        return None
    values = [v for _, v in steps + other]
    width, height, left, right, top, bottom = 560, 230, 64, 16, 14, 40
    lo, hi = min(values), max(values)
    # Losses often fall by orders of magnitude: a linear axis would show a cliff and a flat line. One axis
    # for every report (log, 0.01 to 10, widened only for a loss outside it), so two reports compare by eye.
    log = lo > 0
    if log:
        y0, y1 = min(LOSS_AXIS[0], math.floor(math.log10(lo))), max(LOSS_AXIS[1], math.ceil(math.log10(hi)))
        ticks = [(float(e), f"1e{e}" if e not in (0, 1, 2) else _fmt(10.0 ** e)) for e in range(y0, y1 + 1)]
        def ymap(v: float) -> float:
            return math.log10(v)
    else:
        step = _nice_step(hi - lo) if hi > lo else max(abs(hi) / 2, 0.5)
        y0 = math.floor(lo / step) * step
        y1 = math.ceil(hi / step) * step
        y1 = y1 if y1 > y0 else y0 + step
        count = round((y1 - y0) / step)
        ticks = [(y0 + k * step, _fmt(y0 + k * step)) for k in range(count + 1)]
        def ymap(v: float) -> float:
            return v
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(len(losses), len(overlay or []))

    def sx(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def sy(v: float) -> float:
        return top + plot_h * (1 - (v - y0) / (y1 - y0))

    points = [(round(sx(i), 2), round(sy(ymap(v)), 2), (i + 1) * every, _fmt(v)) for i, v in steps]
    xstep = max(1, math.ceil(n / 8))
    # Every xstep-th step and the last one, unless a regular tick sits too close to the last to read.
    xticks = [(round(sx(i - 1), 2), str(i * every)) for i in range(1, n + 1)
              if i == n or ((i - 1) % xstep == 0 and n - i >= max(1, xstep // 2))]
    return Chart(width, height, left, right, top, bottom, log, points,
                 " ".join(f"{x},{y}" for x, y, _, _ in points),
                 [(round(sy(t), 2), label) for t, label in ticks], xticks,
                 " ".join(f"{round(sx(i), 2)},{round(sy(ymap(v)), 2)}" for i, v in other))


# -- view models --------------------------------------------------------------------------------------


def _diffs(case: ExpectationReport) -> list[dict[str, Any]]:
    diffs = []
    for check in case.checks:
        answer = case.base_answer if check.on == "before" else case.answer
        if check.expected is None or answer is None:
            continue
        diffs.append({
            "check": check.name, "on": check.on, "same": check.expected == answer,
            "segments": [(op, visible(text)) for op, text in diff_segments(check.expected, answer)],
        })
    return diffs


def _case_view(report: SpecReport, case: ExpectationReport) -> dict[str, Any]:
    prefix = report.nodeid + "::"
    return {
        "name": case.nodeid[len(prefix):] if case.nodeid.startswith(prefix) else case.nodeid,
        "nodeid": case.nodeid, "outcome": case.outcome, "location": case.location,
        "xfail_reason": case.xfail_reason,
        "prompt": [{"role": m.get("role", ""), "content": visible(m.get("content", ""))}
                   for m in case.prompt],
        "answer": None if case.answer is None else visible(case.answer),
        "raw_answer": None if case.raw_answer is None else visible(case.raw_answer),
        "base_answer": None if case.base_answer is None else visible(case.base_answer),
        "checks": [{"name": c.name, "argument": shown_argument(c.name, c.argument) if c.name == "eval"
                    else _json(c.argument), "on": c.on, "passed": c.passed,
                    "message": visible(c.message), "expected": c.expected} for c in case.checks],
        "diffs": _diffs(case),
    }


#: Rows of an eval set shown in the page (worst first); the JSON report has every row.
SHOWN_ROWS = 200


def histogram(values: list[float], bins: int = 10, low: float | None = None, high: float | None = None
              ) -> list[dict[str, Any]]:
    """Counts of ``values`` in equal-width bins, for a bar per bin; over the metric's own range when it has
    one (chrF 0-100), so the same metric is binned alike in every report."""
    if not values:
        return []
    low = min(values) if low is None else min(low, *values)
    high = max(values) if high is None else max(high, *values)
    width = (high - low) / bins or 1.0
    counts = [0] * (bins if high > low else 1)
    for value in values:
        counts[min(len(counts) - 1, int((value - low) / width))] += 1
    top = max(counts)
    return [{"label": f"{low + i * width:.3g}-{low + (i + 1) * width:.3g}" if high > low else f"{low:.3g}",
             "count": n, "percent": round(100 * n / top)} for i, n in enumerate(counts)]


def _eval_views(report: SpecReport) -> list[dict[str, Any]]:
    from ..check.metrics import METRICS
    from ..common.uncertainty import Estimate

    views = []
    for nodeid, data in report.eval_sets.items():
        rows = data.get("rows", [])
        estimates = {name: Estimate.from_dict(e) for name, e in (data.get("uncertainty") or {}).items()}
        histograms = []
        for name in data.get("metrics", []):
            scored = [r["scores"][name] for r in rows if name in r.get("scores", {})]
            # NaN and infinity (read back from JSON as text) have no bin: counted beside the bars instead.
            values = [v for v in scored if isinstance(v, int | float) and math.isfinite(v)]
            metric = METRICS.get(name)
            bounded = metric is not None and metric.low is not None and metric.high is not None
            span = (metric.low, metric.high) if bounded else (None, None)
            histograms.append({"metric": name, "bins": histogram(values, low=span[0], high=span[1]),
                               "unbinned": len(scored) - len(values),
                               "mean": _error_bar(estimates.get(f"mean_{name}"), values, *span)})
        views.append({
            "name": f"eval[{data.get('name', '')}]", "nodeid": nodeid, "aggregates": data.get("aggregates", {}),
            "uncertainty": {name: e for name, e in estimates.items() if e is not None},
            "metrics": data.get("metrics", []), "total": len(rows), "rows": rows[:SHOWN_ROWS],
            "has_base": any(r.get("base") for r in rows), "histograms": histograms,
            "seeds": data.get("seeds") or [],
        })
    return views


def _error_bar(estimate, values: list[float], low: float | None = None, high: float | None = None
               ) -> dict[str, Any] | None:
    """Where a metric's mean and its 95% interval fall on the histogram's range (the metric's own, when it
    has one, as the bins), in percent of it."""
    if estimate is None or not values or estimate.low is None:
        return None
    low = min(values + [estimate.low] + ([low] if low is not None else []))
    high = max(values + [estimate.high] + ([high] if high is not None else []))
    span = (high - low) or 1.0

    def at(value: float) -> float:
        return round(100 * (value - low) / span, 1)

    return {"text": estimate.text(), "mean": at(estimate.value), "low": at(estimate.low), "high": at(estimate.high)}


def _seed_views(report: SpecReport) -> list[dict[str, Any]]:
    # Every key the page reads, present: a seed entry from an older or a foreign results file may lack some.
    return [{"outcome": "", "final_loss": None, **seed,
             "chart": loss_chart(seed["losses"], every=logged_every(report)) if seed.get("losses") else None}
            for seed in report.extra.get("seeds") or []]


def _spec_view(index: int, report: SpecReport, history=None) -> dict[str, Any]:
    mask = report.mask
    trend = history.trend(report.nodeid) if history is not None else []
    return {
        "checks_passed": sum(c.outcome in ("passed", "xfailed") for c in report.cases),
        "checks_total": len(report.cases),
        "trend": trend,
        "trend_metrics": sorted({name for h in trend for name in h.get("metrics", {})})[:12],
        "anchor": f"spec-{index}", "report": report,
        "phases": [(PHASE_LABELS.get(k, k), v) for k, v in report.phases.items()],
        "settings": flatten(report.settings),
        "metrics": [(k, v) for k, v in report.metrics.items()],
        "mask": mask,
        "runs": (token_runs(mask.tokens, mask.trained)
                 if mask and len(mask.tokens) == len(mask.trained) else []),
        "chart": loss_chart(report.losses, report.extra.get("recorded_loss_baseline"), logged_every(report))
        if report.losses else None,
        "cases": [_case_view(report, c) for c in report.cases],
        "eval_sets": _eval_views(report),
        "seeds": _seed_views(report),
        "error": report.error,
    }


def _shown(value: Any) -> Any:
    """Every value the page prints, control characters escaped (autoescape then escapes the HTML)."""
    import markupsafe

    if isinstance(value, markupsafe.Markup):  # already HTML (tojson, a chart): escaping adds no markup
        return markupsafe.Markup(safe(value, keep_newlines=True))
    return value if value is None or isinstance(value, int | float) else safe(value, keep_newlines=True)


def _format(template: str, *args: Any) -> str:
    """jinja2's ``format`` for numbers read back from a results file: a non-finite value is written there as
    text (``"nan"``, ``"inf"``), and is shown as that text instead of failing the page."""
    try:
        return template % args
    except (TypeError, ValueError, OverflowError):
        return " ".join(str(a) for a in args)


def page_environment():
    """The jinja2 environment of every HTML page: autoescaped, control characters shown, numbers tolerant."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("sft_spec_plugins.report", "templates"), finalize=_shown,
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["format"] = _format
    return env


def render_html(reports: list[SpecReport], meta: dict[str, Any], history=None) -> str:
    env = page_environment()
    counts = case_outcome_counts(reports)
    spec_counts: dict[str, int] = {}
    for report in reports:
        spec_counts[report.outcome] = spec_counts.get(report.outcome, 0) + 1
    summary = meta.get("summary", {})
    return env.get_template("report.html.j2").render(
        meta=meta,
        environment=meta.get("environment", {}),
        command=shlex.join(meta.get("command", [])),
        duration=summary.get("duration", sum(r.duration for r in reports)),
        counts=[(k, counts[k]) for k in OUTCOME_ORDER if counts.get(k)],
        spec_counts=[(k, spec_counts[k]) for k in OUTCOME_ORDER if spec_counts.get(k)],
        specs=[_spec_view(i, r, history) for i, r in enumerate(reports)],
        has_history=history is not None and bool(history.entries),
        history_warnings=history.warnings if history is not None else [],
    )


# -- the reporter ------------------------------------------------------------------------------------


class HTMLReporter(FileReporter):
    label = "HTML report"

    def render(self, reports, meta) -> str:
        from .history import HISTORY

        return render_html(reports, meta, self.config.stash.get(HISTORY, None))


@hookimpl
def sft_spec_addoption(parser):
    parser.add_argument("--html", dest="html_path", type=output_path, metavar="PATH", default=None,
                        help="write a self-contained HTML report for review")


@hookimpl
def sft_spec_configure(config):
    path = config.getoption("html_path")
    if path and config.role == "main":
        config.pluginmanager.register(HTMLReporter(config, path), "html_reporter")
