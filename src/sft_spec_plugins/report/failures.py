"""The text of a failed expectation: prompt, answer, expected text and a character diff.

One function, so that ``sft-spec run`` (the terminal reporter) and ``pytest`` (the pytest plugin)
show a failure the same way; the diffs are shared with the JUnit and HTML reports.
"""

from __future__ import annotations

import difflib
from typing import Any

from sft_spec.reports import ExpectationReport

from ..common.escape import safe


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


def shown_argument(name: str, argument: Any) -> str:
    """A check's argument as a reader meets it: an eval set as a sentence (the same in a fresh and a cached
    run, whatever order its keys came back in), any other argument as Python shows it."""
    if name == "eval" and isinstance(argument, dict) and "set" in argument:
        rows = argument.get("rows", "?")
        return f"eval set {argument['set']}: {rows} row{'' if rows == 1 else 's'} from {argument.get('source', '?')}"
    return repr(argument)


def format_failure(case: ExpectationReport, losses: list[float] | None = None) -> list[tuple[str, str | None]]:
    """``[(line, style)]``: style ``"failed"`` for lines a colour terminal paints red, else ``None``.
    ``losses``: the spec's training losses, for the strongest "why" line.

    Every line is safe to print: control characters from specs and answers are escaped.
    """
    return [(safe(line), style) for line, style in _failure_lines(case, losses or [])]


#: A final loss above this share of the first: training "barely moved" it.
BARELY_MOVED = 0.9


def why(case: ExpectationReport, losses: list[float]) -> str | None:
    """The likeliest reason an answer check failed, when the run says it plainly."""
    if len(losses) >= 2 and losses[0] > 0 and losses[-1] > BARELY_MOVED * losses[0]:
        return (f"why:      the loss barely moved ({losses[0]:.4g} -> {losses[-1]:.4g} over {len(losses)} logged "
                "steps): the recipe did not train (learning rate, steps, or tokens carrying loss)")
    failed_after = [c for c in case.checks if not c.passed and c.on == "after"]
    if failed_after and case.answer is not None and case.answer == case.base_answer:
        return "why:      the answer is identical to the base model's: training did not change it"
    return None


def _failure_lines(case: ExpectationReport, losses: list[float]) -> list[tuple[str, str | None]]:
    lines: list[tuple[str, str | None]] = [(case.location, None)]
    reason = why(case, losses)
    if reason:
        lines.append((reason, "failed"))
    if case.prompt:
        prompt = case.prompt[-1]["content"] if len(case.prompt) == 1 else case.prompt
        shown = prompt if isinstance(prompt, str) else repr(prompt)
        lines.append((f"prompt:   {shown}", None))
    for check in case.checks:
        if check.passed:
            continue
        answer = case.base_answer if check.on == "before" else case.answer
        label = "before training" if check.on == "before" else "after training"
        lines.append((f"check:    {check.name} {shown_argument(check.name, check.argument)} ({label})", "failed"))
        if answer is not None:
            lines.append((f"answer:   {answer}", None))
        if check.on == "after" and case.raw_answer is not None and case.raw_answer != case.answer:
            lines.append((f"raw:      {case.raw_answer!r}", None))
        if check.expected is not None and answer is not None:
            lines.append((f"expected: {check.expected}", None))
            diff = char_diff(check.expected, answer)
            lines.append((f"diff:     {diff}   ([-expected-] {{+actual+}})", None))
        if check.message:
            lines.append((f"reason:   {check.message}", None))
    if case.base_answer is not None and all(c.on == "after" for c in case.checks if not c.passed):
        lines.append((f"before training the model answered: {case.base_answer}", None))
    return lines
