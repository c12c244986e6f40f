"""The text of a failed expectation: prompt, answer, expected text and a character diff.

One function, so that ``sft-spec run`` (the terminal reporter) and ``pytest`` (the pytest plugin)
show a failure the same way.
"""

from __future__ import annotations

from sft_spec.reports import ExpectationReport, char_diff


def format_failure(case: ExpectationReport) -> list[tuple[str, str | None]]:
    """``[(line, style)]``: style ``"failed"`` for lines a colour terminal paints red, else ``None``."""
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
