"""Planted regressions for bench/gate_power.py: an sft-spec plugin (``-p gate_plants``) that breaks a recipe
the way real changes do, for the specs tagged with the plant's name, and leaves every other spec alone.

- ``plant-mask``: the answer's first two tokens carry no loss (a response template matched one token late,
  as after a collator change: TRL #5138).
- ``plant-eot``: the end of turn and EOS carry no loss (a template that stops training the end of turn).
- ``plant-eval-template``: prompts are rendered with another chat template at evaluation than at training.

The other planted regressions of the bench are plain spec settings (a learning rate divided by 10, LoRA on
``q_proj`` only) and need no plugin.
"""

from __future__ import annotations

from sft_spec import hookimpl
from sft_spec.state import FormattedText


def _planted(item, name: str) -> bool:
    return f"plant-{name}" in item.spec.tags


@hookimpl(wrapper=True)
def sft_spec_make_mask(item, run, formatted, index):
    example = yield
    if example is None or not (_planted(item, "mask") or _planted(item, "eot")):
        return example
    labels = list(example.labels)
    trained = [i for i, label in enumerate(labels) if label != -100]
    if _planted(item, "mask"):
        for i in trained[:2]:
            labels[i] = -100
    if _planted(item, "eot"):
        tokenizer = run.loaded.tokenizer
        stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")}
        labels = [-100 if token in stop else label for token, label in zip(example.input_ids, labels, strict=True)]
    example.labels = labels
    return example


@hookimpl(tryfirst=True)
def sft_spec_format(item, run, messages, add_generation_prompt):
    if not (add_generation_prompt and _planted(item, "eval-template")):
        return None
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant: "
    return FormattedText(text=text, prompt_end=len(text))
