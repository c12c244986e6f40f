"""Forgetting probes: `retains` compares with the base model's answer, which is generated once per base
model and reused by every spec on it."""

from __future__ import annotations

PROBE = """\
    model: builtin:tiny-chatml
    method: {method}
    lora: {{r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}}
    training: {{num_train_epochs: {epochs}, learning_rate: {lr}, per_device_train_batch_size: 8}}
    generation: {{max_new_tokens: 16}}
    data:
      conversations:
        - - {{role: user, content: 微调测试}}
          - {{role: assistant, content: 我学会了}}
    expect:
      - prompt: 你好
        retains: {retains}
"""


def test_over_trained_full_fine_tune_forgets_and_base_answers_are_reused(sft, write_spec):
    # a: a strong full fine-tune on another answer changes what the model says to 你好.
    folder = write_spec("a.sft.yaml", PROBE.format(method="full", epochs=30, lr=3e-3, retains="true")).parent
    # b: the same base model and probe (after a's full fine-tune the base is reloaded, so b starts clean).
    write_spec("b.sft.yaml", PROBE.format(method="lora", epochs=1, lr=1e-9, retains="{similar: 0.9}"))
    result = sft("run", folder, "--no-cache")
    a, b = result.recorder.reports
    probe_a, probe_b = a.expectations[0], b.expectations[0]
    assert probe_a.outcome == "failed"
    assert probe_a.answer != probe_a.base_answer
    assert "forgot the base model's answer" in probe_a.checks[0].message
    assert "retains" in result.out and "FAILED" in result.out
    # b's base answer came from the cache filled by a, and the untouched model kept it.
    assert b.metrics.get("base_answers_reused") == 1 and "base_answers_reused" not in a.metrics
    assert probe_b.base_answer == probe_a.base_answer
    assert probe_b.outcome == "passed", probe_b.checks


def test_retains_arguments_are_validated(sft, write_spec):
    text = PROBE.format(method="full", epochs=1, lr=1e-3, retains="{similar: 2}")
    result = sft("validate", write_spec("bad.sft.yaml", text))
    assert result.code == 1
    assert "retains.similar: expected a number from 0 to 1" in result.out


def test_base_answers_are_kept_between_runs_when_the_base_model_and_prompts_are_unchanged(sft, write_spec, tmp_path):
    # A pull request that changes the recipe (a cache miss for the result) asked the unchanged base model
    # the same prompts again; they come from the cache folder now, and are the same answers.
    from conftest import GEMMA_ONE_ANSWER

    cache = tmp_path / "cache"
    first = sft("run", write_spec("b.sft.yaml", GEMMA_ONE_ANSWER.format(method="lora", epochs=2, lr=1e-3)),
                "--cache-dir", cache).recorder.reports[0]
    assert "base_answers_from_cache_dir" not in first.metrics and first.expectations[0].base_answer is not None
    changed = write_spec("b.sft.yaml", GEMMA_ONE_ANSWER.format(method="lora", epochs=3, lr=1e-3))
    second = sft("run", changed, "--cache-dir", cache).recorder.reports[0]
    assert second.metrics.get("base_answers_from_cache_dir") == 1, second.metrics
    assert second.expectations[0].base_answer == first.expectations[0].base_answer
    fresh = sft("run", changed, "--cache-dir", cache, "--no-cache").recorder.reports[0]
    assert "base_answers_from_cache_dir" not in fresh.metrics  # --no-cache: everything generated again
