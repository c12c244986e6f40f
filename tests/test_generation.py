"""Generation: batched answers equal one-by-one answers; answers stop at the end of the turn."""

from __future__ import annotations

from types import SimpleNamespace

from sft_spec_plugins.generation import generate_answers, stop_token_ids


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
            from sft_spec_plugins.models import MODEL_CACHE

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
