"""The comparison as one self-contained HTML page: the report's offline rules (inline CSS, a CSP that
forbids loading anything, everything escaped), a row per spec, and per change the answers' diff, the
loss curves of both runs on one chart, the settings and versions that differ."""

from __future__ import annotations

from typing import Any

from .failures import diff_segments
from .html_report import loss_chart, page_environment, visible


def _spec_view(index: int, spec, items) -> dict[str, Any]:
    before, after = spec.losses
    return {
        "anchor": f"change-{index}", "change": spec, "transition": spec.label, "findings": items,
        "counted": any(f.counted for f in items),
        "chart": loss_chart(after, before) if after or before else None,
        "cases": [{
            "case": case, "changed": case.before != case.after or case.answer_changed,
            "segments": [(op, visible(t)) for op, t in diff_segments(case.answer_before or "", case.answer_after or "")]
            if case.answer_changed else [],
        } for case in spec.cases],
    }


def render_comparison(comparison, shown: list, indent: dict[str, str], header: list[str]) -> str:
    """``shown``: compare.findings(comparison), the evidence every rendering shows; ``indent``: its nesting;
    ``header``: the lines every rendering starts with (BASE, HEAD and their commits, notes)."""
    env = page_environment()
    counts = [(t, comparison.count(t)) for t in ("regressed", "fixed", "changed", "new", "removed", "unchanged")]
    order = {id(spec): i for i, (spec, _) in enumerate(shown)}
    views = [_spec_view(i, s, items) for i, (s, items) in enumerate(shown)]
    rest = [spec for spec in comparison.specs if id(spec) not in order]
    views += [_spec_view(len(views) + i, spec, []) for i, spec in enumerate(rest)]
    return env.get_template("compare.html.j2").render(
        comparison=comparison, counts=[(t, n) for t, n in counts if n], specs=views, indent=indent,
        shown=len(shown), header=[line for line in header if not line.startswith("library versions")],
    )
