"""Collators: which tokens carry the loss.

The mask is computed on characters and mapped to tokens through the tokenizer's offsets, so it does
not depend on how a tokenizer happens to split the response template in context (the classic failure
of the removed ``DataCollatorForCompletionOnlyLM``).

- ``completion_only``: loss after the last ``response_template`` (with ``instruction_template``: every
  response between instructions), as ``DataCollatorForCompletionOnlyLM`` did.
- ``assistant_only``: every assistant turn of a multi-turn chat, end-of-turn marker included.
- ``full``: every token.
"""

from __future__ import annotations

from sft_spec import hookimpl
from sft_spec.errors import SpecError, did_you_mean
from sft_spec.loading.expectations import plugin_validate
from sft_spec.state import FormattedText, MaskedExample

from .formatters import FORMAT

IGNORE_INDEX = -100
#: Collators removed from TRL, mapped to the sft-spec collator that re-creates them.
RENAMED_COLLATORS = {"DataCollatorForCompletionOnlyLM": "completion_only"}


def tokenize_with_offsets(text: str, tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets; special tokens in the text (the template's own) stay special."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def mask_from_spans(formatted: FormattedText, tokenizer, spans: list[tuple[int, int]]) -> MaskedExample:
    """Train every token that overlaps one of the character spans."""
    ids, offsets = tokenize_with_offsets(formatted.text, tokenizer)
    labels = []
    for token_id, (start, end) in zip(ids, offsets, strict=True):
        inside = any(start < s_end and max(end, start + 1) > s_start for s_start, s_end in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return MaskedExample(input_ids=ids, labels=labels, formatted=formatted, offsets=offsets)


class CompletionOnlyCollator:
    """Loss only after the response template: what ``DataCollatorForCompletionOnlyLM`` did, on characters."""

    def spans(self, formatted: FormattedText, response_template: str, instruction_template: str | None) -> list:
        text = formatted.text
        starts = []
        pos = text.find(response_template)
        while pos >= 0:
            starts.append(pos + len(response_template))
            pos = text.find(response_template, pos + 1)
        if not starts:
            shown = text if len(text) < 300 else text[:300] + "..."
            raise SpecError(
                f"response_template {response_template!r} does not occur in the formatted text {shown!r}: "
                "nothing would be trained (set format.response_template to the text before each answer)"
            )
        if not instruction_template:
            return [(starts[-1], len(text))]
        spans = []
        for start in starts:
            following = text.find(instruction_template, start)
            spans.append((start, following if following >= 0 else len(text)))
        return spans

    def mask(self, formatted, tokenizer, fmt, *, markers) -> MaskedExample:
        response_template = fmt.response_template or markers.response_template
        if not response_template:
            raise SpecError("cannot derive the response template from the chat template: set format.response_template")
        return mask_from_spans(formatted, tokenizer, self.spans(formatted, response_template, fmt.instruction_template))


class AssistantOnlyCollator:
    """Loss on every assistant turn (multi-turn chats), as located by the formatter."""

    def mask(self, formatted, tokenizer, fmt, *, markers) -> MaskedExample:
        return mask_from_spans(formatted, tokenizer, formatted.assistant_spans)


class FullCollator:
    """Loss on every token, prompt included (plain language modelling)."""

    def mask(self, formatted, tokenizer, fmt, *, markers) -> MaskedExample:
        return mask_from_spans(formatted, tokenizer, [(0, len(formatted.text))])


@hookimpl(trylast=True)
def sft_spec_register_collators(register) -> None:
    register("completion_only", CompletionOnlyCollator(),
             "loss after the last response_template (DataCollatorForCompletionOnlyLM's behaviour)")
    register("assistant_only", AssistantOnlyCollator(), "loss on every assistant turn of a multi-turn chat")
    register("full", FullCollator(), "loss on every token")


@hookimpl
def sft_spec_validate_spec(item, config) -> list[SpecError]:
    """Old TRL collator names read as today's, with a note; the collator exists and accepts ``format:``."""
    fmt, table, where = item.section(FORMAT), config.registry.collators, item.locate("format", "collator")
    if fmt.collator in RENAMED_COLLATORS:
        old, fmt.collator = fmt.collator, RENAMED_COLLATORS[fmt.collator]
        item.notes.append(f"{where}: note: {old} was removed from TRL; sft-spec's {fmt.collator!r} collator does "
                          "what it did")
    if fmt.collator not in table:
        return [SpecError(did_you_mean(fmt.collator, list(table), "collator"), where, key="format.collator")]
    problem = plugin_validate(getattr(table[fmt.collator].obj, "validate", None), fmt, f"collator {fmt.collator!r}")
    return [SpecError(problem, where, key="format.collator")] if problem else []


@hookimpl(trylast=True)
def sft_spec_make_mask(item, run, formatted, index) -> MaskedExample:
    fmt = item.section(FORMAT)
    collator = run.config.registry.collators[fmt.collator].obj
    markers = run.markers
    try:
        example = collator.mask(formatted, run.loaded.tokenizer, fmt, markers=markers)
    except SpecError as exc:
        raise SpecError(f"conversation {index}: {exc.message}", exc.location, exc.key) from None
    max_length = item.spec.training.get("max_length", 1024)
    if max_length and len(example.input_ids) > max_length:
        run.note(f"a training conversation has {len(example.input_ids)} tokens; truncated to max_length={max_length}")
        example.input_ids = example.input_ids[:max_length]
        example.labels = example.labels[:max_length]
    if all(label == IGNORE_INDEX for label in example.labels):
        raise SpecError(f"the loss mask of collator {fmt.collator!r} trains no token of conversation {index}: "
                        f"{formatted.text[:200]!r}")
    eot = markers.end_of_turn if markers else None
    if eot:
        trained_text = "".join(
            formatted.text[s:e] for (s, e), lab in zip(example.offsets, example.labels, strict=False)
            if lab != IGNORE_INDEX
        )
        if eot not in trained_text:
            run.note(f"warning: the loss mask leaves out the end-of-turn token {eot!r}: "
                     "the model would never learn to stop")
    return example
