"""Which tokens carry the loss, per collator, on both tiny models, shown as decoded text."""

from __future__ import annotations

import pytest
from conftest import trained_text

from sft_spec.errors import SpecError

ONE = """\
model: {model}
checks: {{loss_decreased: true}}
format: {{collator: {collator}{extra}}}
data:
  conversations:
    - - {{role: user, content: 微调测试}}
      - {{role: assistant, content: 我学会了}}
"""

MULTI = """\
model: {model}
checks: {{loss_decreased: true}}
format: {{collator: {collator}{extra}}}
data:
  conversations:
    - - {{role: user, content: 你好}}
      - {{role: assistant, content: 你好！}}
      - {{role: user, content: 微调测试}}
      - {{role: assistant, content: 我学会了}}
"""

GEMMA, CHATML = "builtin:tiny-gemma", "builtin:tiny-chatml"


def spec(template: str, model: str, collator: str, extra: str = "") -> str:
    return template.format(model=model, collator=collator, extra=extra)


@pytest.mark.parametrize("model,expected", [
    # The reference recipe: response, end-of-turn and the EOS the formatter appends.
    (GEMMA, "我学会了<end_of_turn>\n<eos>"),
    # ChatML's end-of-turn is its EOS token: no second one is appended.
    (CHATML, "我学会了<|im_end|>\n"),
])
def test_completion_only_trains_the_response_after_the_derived_template(prepare, model, expected):
    item, run = prepare(spec(ONE, model, "completion_only"))
    assert trained_text(item, run) == expected


def test_completion_only_with_the_blog_response_template(prepare):
    item, run = prepare(spec(ONE, GEMMA, "completion_only", ', response_template: "<start_of_turn>model\\n"'))
    assert trained_text(item, run) == "我学会了<end_of_turn>\n<eos>"


@pytest.mark.parametrize("model,expected", [
    (GEMMA, "你好！<end_of_turn>\n | 我学会了<end_of_turn>\n<eos>"),
    (CHATML, "你好！<|im_end|>\n | 我学会了<|im_end|>\n"),
])
def test_assistant_only_trains_every_assistant_turn(prepare, model, expected):
    item, run = prepare(spec(MULTI, model, "assistant_only"))
    assert trained_text(item, run) == expected


def test_completion_only_trains_only_the_last_response_like_the_old_collator(prepare):
    item, run = prepare(spec(MULTI, GEMMA, "completion_only"))
    assert trained_text(item, run) == "我学会了<end_of_turn>\n<eos>"


def test_completion_only_with_instruction_template_trains_each_response(prepare):
    extra = ', instruction_template: "<start_of_turn>user\\n"'
    item, run = prepare(spec(MULTI, GEMMA, "completion_only", extra))
    assert trained_text(item, run) == "你好！<end_of_turn>\n | 我学会了<end_of_turn>\n<eos>"


@pytest.mark.parametrize("model", [GEMMA, CHATML])
def test_full_trains_every_token(prepare, model):
    item, run = prepare(spec(ONE, model, "full"))
    formatted = run.config.hook.sft_spec_format(item=item, run=run, messages=item.conversations[0],
                                                add_generation_prompt=False)
    assert trained_text(item, run) == formatted.text.replace("<bos>", "", 0)
    assert "微调测试" in trained_text(item, run)


def test_a_response_template_that_never_occurs_is_an_error(prepare):
    item, run = prepare(spec(ONE, GEMMA, "completion_only", ', response_template: "### Answer:"'))
    with pytest.raises(SpecError, match="does not occur in the formatted text"):
        trained_text(item, run)


def test_leaving_out_the_end_of_turn_token_is_a_warning(prepare):
    template = '"{% for m in messages %}{{ m.role }}: {{ m.content }}\\n{% endfor %}'
    template += '{% if add_generation_prompt %}assistant: {% endif %}"'
    text = spec(ONE, GEMMA, "completion_only", f", formatter: template, add_eos: false, template: {template}")
    item, run = prepare(text)
    assert trained_text(item, run) == "我学会了\n"
    assert any("leaves out the end-of-turn token '<eos>'" in n for n in run.notes), run.notes


def test_prompts_end_with_the_generation_prompt(prepare):
    item, run = prepare(spec(ONE, GEMMA, "completion_only"))
    prompt = run.config.hook.sft_spec_format(item=item, run=run, messages=[{"role": "user", "content": "微调测试"}],
                                             add_generation_prompt=True)
    assert prompt.text == "<bos><start_of_turn>user\n微调测试<end_of_turn>\n<start_of_turn>model\n"


def test_a_mask_error_names_the_conversation(sft, write_spec):
    """Before, the conversation's index was always None: with many conversations, which one is broken?"""
    template = '"{% for m in messages %}{{ m.content }}\\n{% endfor %}"'
    text = f"""\
model: builtin:tiny-gemma
format: {{formatter: template, template: {template}, response_template: "R:"}}
checks: {{loss_decreased: true}}
data:
  conversations:
    - - {{role: user, content: "question R:"}}
      - {{role: assistant, content: answer}}
    - - {{role: user, content: question}}
      - {{role: assistant, content: answer}}
"""
    result = sft("run", write_spec("two.sft.yaml", text), "--no-cache")
    report = result.recorder.reports[0]
    assert report.outcome == "error" and report.error.phase == "mask"
    assert report.error.message.startswith("conversation 1: response_template 'R:' does not occur")
