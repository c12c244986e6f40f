"""The text of a failed expectation: prompt, answer, expected text and a character diff.

One function, so that ``sft-spec run`` (the terminal reporter) and ``pytest`` (the pytest plugin)
show a failure the same way; the diffs are shared with the JUnit and HTML reports.
"""

from __future__ import annotations

import difflib

from sft_spec.reports import ExpectationReport

from .escape import safe


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


def format_failure(case: ExpectationReport) -> list[tuple[str, str | None]]:
    """``[(line, style)]``: style ``"failed"`` for lines a colour terminal paints red, else ``None``.

    Every line is safe to print: control characters from specs and answers are escaped.
    """
    return [(safe(line), style) for line, style in _failure_lines(case)]


def _failure_lines(case: ExpectationReport) -> list[tuple[str, str | None]]:
    lines: list[tuple[str, str | None]] = [(case.location, None)]
    if case.prompt:
        prompt = case.prompt[-1]["content"] if len(case.prompt) == 1 else case.prompt
        shown = prompt if isinstance(prompt, str) else repr(prompt)
        lines.append((f"prompt:   {shown}", None))
    for check in case.checks:
        if check.passed:
            continue
        answer = case.base_answer if check.on == "before" else case.answer
        label = "before training" if check.on == "before" else "after training"
        lines.append((f"check:    {check.name} {check.argument!r} ({label})", "failed"))
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
