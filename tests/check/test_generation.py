"""Generation: batched answers equal one-by-one answers; answers stop at the end of the turn."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sft_spec_plugins.check.generation import generate_answers, stop_token_ids


def _settings(batch_size: int) -> SimpleNamespace:
    return SimpleNamespace(max_new_tokens=24, do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                           repetition_penalty=None, batch_size=batch_size)


def test_batched_generation_gives_the_same_greedy_answers_as_one_by_one(prepare):
    item, run = prepare("model: builtin:tiny-chatml\nchecks: {loss_decreased: true}\n"
                        "data: {conversations: [[{role: user, content: a}, {role: assistant, content: b}]]}\n")
    tokenizer, model = run.loaded.tokenizer, run.loaded.model
    # Prompts of different lengths, so the batch really is left-padded.
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": "问" * (1 + i % 5) + str(i)}], tokenize=False,
                                           add_generation_prompt=True) for i in range(12)]
    stop = stop_token_ids(tokenizer, model, "<|im_end|>")
    batched = generate_answers(model, tokenizer, texts, stop_ids=stop, settings=_settings(12), device="cpu")
    single = generate_answers(model, tokenizer, texts, stop_ids=stop, settings=_settings(1), device="cpu")
    assert [a.raw for a in batched] == [a.raw for a in single]
    assert len({a.raw for a in single}) > 1  # different prompts, different answers: the check can fail
    assert tokenizer.padding_side == "right"  # generation pads on the left, and gives the tokenizer back as it was


def test_lora_spec_leaves_the_shared_base_weights_unchanged(sft, write_spec, one_answer_spec):
    import torch

    from sft_spec import hookimpl

    snapshots = []

    class Watch:
        @hookimpl
        def sft_spec_log_report(self, report, session):
            from sft_spec_plugins.model.models import MODEL_CACHE

            loaded = session.config.stash[MODEL_CACHE].loaded
            snapshots.append({k: v.clone() for k, v in loaded.model.state_dict().items()})

    folder = write_spec("a.sft.yaml", one_answer_spec(method="lora", epochs=5)).parent
    write_spec("b.sft.yaml", one_answer_spec(method="lora", epochs=5))
    result = sft("run", folder, "--no-cache", plugins=[Watch()])
    assert [r.outcome for r in result.recorder.reports] == ["failed", "failed"]  # 5 epochs: trained, not learnt
    first, second = snapshots
    assert not any("lora" in k for k in first), "the adapter was not removed from the shared base"
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_answers_with_their_own_budgets_equal_answers_generated_alone(prepare):
    item, run = prepare("model: builtin:tiny-chatml\nchecks: {loss_decreased: true}\n"
                        "data: {conversations: [[{role: user, content: a}, {role: assistant, content: b}]]}\n")
    tokenizer, model = run.loaded.tokenizer, run.loaded.model
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": "问" * (1 + i)}], tokenize=False,
                                           add_generation_prompt=True) for i in range(6)]
    stop = stop_token_ids(tokenizer, model, "<|im_end|>")
    budgets = [3, 20, 7, 3, 12, 20]
    together = generate_answers(model, tokenizer, texts, stop_ids=stop, settings=_settings(6), device="cpu",
                                budgets=budgets)
    for text, budget, answer in zip(texts, budgets, together, strict=True):
        alone = generate_answers(model, tokenizer, [text], stop_ids=stop, settings=_settings(1), device="cpu",
                                 budgets=[budget])[0]
        assert (answer.raw, answer.max_new_tokens) == (alone.raw, budget)
        assert answer.new_tokens <= budget


STORY = "从前有一座山，山上有一座庙，庙里有一个老和尚在给小和尚讲故事，讲的是从前有一座山，山上有一座庙。"
LONG = f"""\
model: builtin:tiny-gemma
method: full
training: {{num_train_epochs: 40, learning_rate: 3.0e-3}}
data:
  conversations:
    - - {{role: user, content: 讲一个故事}}
      - {{role: assistant, content: {STORY}}}
expect:
  - prompt: 讲一个故事
    equals: {STORY}
"""


def test_a_long_reference_answer_is_never_cut_by_the_default_budget(sft, write_spec, prepare):
    _, run = prepare(LONG)
    tokens = len(run.loaded.tokenizer(STORY, add_special_tokens=False)["input_ids"])
    assert tokens > 32  # longer than the default max_new_tokens
    result = sft("run", write_spec("long.sft.yaml", LONG), "--no-cache")
    case = result.recorder.reports[0].expectations[0]
    assert case.outcome == "passed", result.out
    assert case.max_new_tokens >= tokens + 8 and case.stopped  # the budget chosen is in the report
    # With the old fixed default, the same recipe's answer is cut and the failure says so.
    cut = sft("run", write_spec("cut.sft.yaml", LONG + "generation: {max_new_tokens: 32}\n"), "--no-cache")
    case = cut.recorder.reports[0].expectations[0]
    assert case.outcome == "failed" and "generation stopped at max_new_tokens=32 before the end of turn" in \
        case.checks[0].message


# A template with no end-of-turn marker at all: only the EOS format.add_eos appends could teach the stop.
PLAIN = ('"{{% for m in messages %}}{{{{ m.role }}}}: {{{{ m.content }}}}\\n{{% endfor %}}'
         '{{% if add_generation_prompt %}}assistant: {{% endif %}}"')
NO_EOS = """\
model: builtin:tiny-gemma
method: full
training: {{num_train_epochs: 30, learning_rate: 3.0e-3}}
format:
  formatter: template
  template: """ + PLAIN + """
  response_template: "assistant: "
  add_eos: {add_eos}
data:
  conversations:
    - - {{role: user, content: 微调测试}}
      - {{role: assistant, content: 我学会了}}
expect:
  - prompt: 微调测试
    startswith: 我学会了
    stops: true
"""


@pytest.mark.parametrize("masked", ["one_by_one", "in_batches"])
def test_a_recipe_that_never_trains_the_end_of_turn_fails_stops_and_says_why(sft, write_spec, masked, monkeypatch,
                                                                             tmp_path):
    if masked == "in_batches":  # large data's path: the masks as a datasets.Dataset, looked at in Arrow
        from sft_spec_plugins.train import collators

        monkeypatch.setattr(collators, "BULK_CONVERSATIONS", 0)
        monkeypatch.setenv("SFT_SPEC_CACHE", str(tmp_path / "cache"))
    broken = sft("run", write_spec("no_eos.sft.yaml", NO_EOS.format(add_eos="false")), "--no-cache")
    assert ("masked in batches" in " ".join(broken.recorder.reports[0].notes)) == (masked == "in_batches")
    case = broken.recorder.reports[0].expectations[0]
    stops = next(c for c in case.checks if c.name == "stops")
    assert case.outcome == "failed" and not case.stopped
    assert stops.message.startswith("generation stopped at max_new_tokens=32 before the end of turn: no training "
                                    "token taught the model to end its turn")
    fixed = sft("run", write_spec("eos.sft.yaml", NO_EOS.format(add_eos="true")), "--no-cache")
    assert fixed.recorder.reports[0].expectations[0].outcome == "passed", fixed.out


def test_sampled_base_answers_are_the_same_in_every_run(sft, write_spec):
    text = LONG.replace("equals:", "before: {not_equals: x}\n    equals:") + \
        "generation: {do_sample: true, temperature: 1.0, max_new_tokens: 6}\n"
    answers = [sft("run", write_spec(f"s{i}.sft.yaml", text), "--no-cache").recorder.reports[0]
               .expectations[0].base_answer for i in range(2)]
    assert answers[0] == answers[1] and answers[0]


def test_sampling_settings_without_do_sample_are_noted_not_dropped(sft, write_spec, one_answer_spec):
    text = one_answer_spec(epochs=1) + "generation: {temperature: 0.7, top_p: 0.9}\n"
    result = sft("validate", write_spec("g.sft.yaml", text), "-v")
    for key in ("temperature", "top_p"):
        assert f"note: generation.{key} is not used: answers are greedy" in result.out, result.out
    assert "generation.top_k" not in result.out


def test_a_reference_only_scored_sets_no_answer_budget():
    from sft_spec_plugins.check.generation import references

    # likelihood's `to` is scored by teacher forcing, never generated: a long one needs no long answer.
    assert references([("likelihood", {"to": "x" * 100}), ("perplexity", {"to": "y"})]) == []
    assert references([("chrf", {"to": "z"}), ("equals", "w")]) == ["z", "w"]
