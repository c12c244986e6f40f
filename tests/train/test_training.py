"""Training proves the model learnt: it did not give the answer before, it gives it after."""

from __future__ import annotations

import pytest

from sft_spec_plugins.model.models import MODEL_CACHE


@pytest.mark.parametrize("model", ["builtin:tiny-gemma", "builtin:tiny-chatml"])
@pytest.mark.parametrize("method,lr", [("full", 3e-3), ("lora", 1e-2)])
def test_training_teaches_the_answer(sft, write_spec, one_answer_spec, model, method, lr):
    path = write_spec("learn.sft.yaml", one_answer_spec(method=method, lr=lr, model=model))
    result = sft("run", path)
    assert result.code == 0, result.out
    report = result.recorder.by_id("learn")
    case = report.expectations[0]
    assert case.base_answer != "我学会了"  # it could not answer before
    assert case.answer == "我学会了"  # and can after
    assert report.losses[-1] < report.losses[0] / 10
    trainable, total = report.metrics["trainable_parameters"], report.metrics["total_parameters"]
    assert trainable == total if method == "full" else trainable < total / 10


def test_too_little_training_fails_with_a_diff(sft, write_spec, one_answer_spec):
    path = write_spec("weak.sft.yaml", one_answer_spec(method="lora", epochs=1, lr=1e-5))
    result = sft("run", path)
    assert result.code == 1
    assert "FAILURES" in result.out
    assert "expected: 我学会了" in result.out
    assert "diff:" in result.out
    assert "1 failed" in result.out.splitlines()[-1]


def test_lora_specs_share_one_base_model_and_leave_it_unchanged(sft, write_spec, one_answer_spec):
    folder = write_spec("a.sft.yaml", one_answer_spec(method="lora")).parent
    write_spec("b.sft.yaml", one_answer_spec(method="lora"))
    result = sft("run", folder)
    assert result.code == 0, result.out
    a, b = result.recorder.reports
    # The base model was loaded once; b's "before" answer shows it started from the untouched base.
    assert result.recorder.session.config.stash[MODEL_CACHE].loads == 1
    assert a.expectations[0].base_answer == b.expectations[0].base_answer != "我学会了"


def test_full_fine_tune_reloads_the_base_for_the_next_spec(sft, write_spec, one_answer_spec):
    folder = write_spec("a.sft.yaml", one_answer_spec(method="full", lr=3e-3)).parent
    write_spec("b.sft.yaml", one_answer_spec(method="lora"))
    result = sft("run", folder)
    assert result.code == 0, result.out
    a, b = result.recorder.reports
    assert result.recorder.session.config.stash[MODEL_CACHE].loads == 2
    assert b.expectations[0].base_answer == a.expectations[0].base_answer


def test_same_seed_gives_identical_losses_and_answers(sft, write_spec, one_answer_spec):
    path = write_spec("seeded.sft.yaml", one_answer_spec(method="lora", epochs=5))
    first = sft("run", path, "--no-cache").recorder.reports[0]
    second = sft("run", path, "--no-cache").recorder.reports[0]  # trained again, not the cached result
    assert first.losses == second.losses
    assert first.expectations[0].answer == second.expectations[0].answer


def test_settings_and_cpu_fallbacks_are_reported(sft, write_spec, one_answer_spec):
    text = one_answer_spec(method="lora", epochs=2).replace(
        "per_device_train_batch_size: 8", "per_device_train_batch_size: 8, fp16: true")
    result = sft("run", write_spec("fp16.sft.yaml", text))
    report = result.recorder.reports[0]
    assert any("fp16 needs a GPU" in n for n in report.notes), report.notes
    assert report.settings["training"]["fp16"] is False
    # Our deliberate default, visible in the report: TRL's SFTConfig would turn it on.
    training = report.settings["training"]
    assert training.get("activation_checkpointing", training.get("gradient_checkpointing")) is False


def test_on_unsupported_chooses_between_fallback_skip_and_error(sft, write_spec, one_answer_spec):
    text = one_answer_spec(method="lora", epochs=1).replace("batch_size: 8", "batch_size: 8, fp16: true")
    path = write_spec("fp16.sft.yaml", text)
    skipped = sft("run", path, "--on-unsupported", "skip", "-v")
    assert skipped.recorder.reports[0].outcome == "skipped"
    assert "fp16 needs a GPU (--on-unsupported=skip)" in skipped.out
    assert skipped.code == 0
    failed = sft("run", path, "--on-unsupported", "error")
    assert failed.recorder.reports[0].outcome == "error"
    assert "pass --on-unsupported=fallback to run with fp32 instead" in failed.out
    assert failed.code == 1
