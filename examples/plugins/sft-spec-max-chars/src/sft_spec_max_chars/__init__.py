"""An sft-spec plugin: a ``max_chars`` check on answers and a ``plain`` formatter.

``max_chars: N`` holds when the answer has at most N characters. The ``plain`` formatter writes a
conversation as ``User: ...`` / ``Assistant: ...`` lines, for base models that have no chat template.
"""

from __future__ import annotations

from typing import Any

from sft_spec import hookimpl
from sft_spec.registry import Check, CheckContext, CheckResult
from sft_spec.state import FormattedText

# -- the check ---------------------------------------------------------------------------------------


def validate_max_chars(value: Any) -> str | None:
    """Runs at load time (``sft-spec validate``), so a bad argument is a located spec error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"max_chars: expected a positive integer, got {value!r}"
    return None


def max_chars(answer: str, limit: int, ctx: CheckContext) -> CheckResult:
    ok = len(answer) <= limit
    return CheckResult(ok, f"{len(answer)} characters (limit {limit})")


@hookimpl
def sft_spec_register_checks(register) -> None:
    register(Check("max_chars", max_chars, "the answer has at most N characters", validate_max_chars))


# -- the formatter -----------------------------------------------------------------------------------

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


class PlainFormatter:
    """``User: question`` / ``Assistant: answer<eos>``: every assistant turn ends with EOS, so
    generation knows where the answer stops."""

    def validate(self, fmt: Any) -> str | None:
        return None  # nothing in format: to check; a formatter that needs a key would say so here

    def format(self, messages: list[dict], tokenizer: Any, fmt: Any, *, add_generation_prompt: bool = False,
               template: str | None = None) -> FormattedText:
        eos = tokenizer.eos_token or ""
        text = tokenizer.bos_token or ""
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if i:
                text += "\n"
            text += f"{ROLE_NAMES[message['role']]}: "
            start = len(text)
            text += message["content"]
            if message["role"] == "assistant":
                text += eos
                # What the model must learn to write: the answer and the EOS after it.
                spans.append((start, len(text)))
        if add_generation_prompt:
            text += "\nAssistant: "
        return FormattedText(text=text, assistant_spans=spans, prompt_end=spans[-1][0] if spans else len(text))


@hookimpl
def sft_spec_register_formatters(register) -> None:
    register("plain", PlainFormatter(), "User: ... / Assistant: ... lines, no chat template needed")
