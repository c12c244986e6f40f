"""Adapter round trip: the saved adapter, reloaded on a fresh base and merged, answers as trained; a run
whose in-memory model differs from what the adapter holds fails, naming the prompts."""

from __future__ import annotations

from sft_spec import hookimpl

SPEC = """\
    model: builtin:tiny-gemma
    method: {method}
    lora: {{r: 16, lora_alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
    training: {{num_train_epochs: 3, learning_rate: 1.0e-2, per_device_train_batch_size: 8}}
    generation: {{max_new_tokens: 6}}
    data:
      conversations:
        - - {{role: user, content: 微调测试}}
          - {{role: assistant, content: 我学会了}}
    expect:
      - {{prompt: 微调测试, not_equals: x}}
      - {{prompt: 你好, not_equals: x}}
    checks:
      roundtrip: true
"""


class TouchTheBase:
    """A training bug the adapter does not carry: a base weight changed in memory only."""

    @hookimpl(wrapper=True)
    def sft_spec_train(self, item, run, trainer):
        import torch

        losses = yield
        run.loaded.dirty = True  # reload the base for later specs
        with torch.no_grad():
            run.model.get_base_model().lm_head.weight.mul_(-1.0)
        return losses


def test_adapter_round_trip_passes_and_is_saved(sft, write_spec, tmp_path):
    path = write_spec("rt.sft.yaml", SPEC.format(method="lora"))
    result = sft("run", path, "--no-cache", "--output-dir", tmp_path / "out", "-v")
    assert result.code == 0, result.out
    check = result.recorder.reports[0].training_checks[0].checks[0]
    assert check.passed and "agree on 2 prompts" in check.message
    assert list((tmp_path / "out").rglob("adapter/adapter_model.safetensors"))


def test_round_trip_fails_when_the_model_in_memory_is_not_what_was_saved(sft, write_spec):
    result = sft("run", write_spec("rt.sft.yaml", SPEC.format(method="lora")), "--no-cache",
                 plugins=[TouchTheBase()])
    assert result.code == 1
    check = result.recorder.reports[0].training_checks[0].checks[0]
    assert not check.passed
    assert "prompts differ" in check.message and "'微调测试': trained" in check.message


def test_round_trip_needs_an_adapter(sft, write_spec):
    result = sft("validate", write_spec("full.sft.yaml", SPEC.format(method="full")))
    assert result.code == 1
    assert "checks.roundtrip needs method lora or qlora" in result.out
