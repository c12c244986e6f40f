"""What the machine cannot run goes through --on-unsupported: fall back and say so, skip, or fail.

QLoRA trains for real on this CPU (bitsandbytes has a CPU backend for 4-bit layers and 8-bit optimizers);
a machine without one is simulated by making ``import bitsandbytes`` fail, as it does where the package
or its backend is missing. Every run here passes --no-cache: a result cached on the real machine must not
answer for the simulated one.
"""

from __future__ import annotations

import sys
import warnings

import pytest


def run_one(sft, write_spec, text: str, *options: str, name: str = "s.sft.yaml"):
    result = sft("run", write_spec(name, text), "--no-cache", "-v", *options)
    return result, result.recorder.reports[0]


def test_a_missing_device_falls_back_to_the_cpu_skips_or_fails(sft, write_spec, one_answer_spec):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    text = one_answer_spec(method="lora")
    result, report = run_one(sft, write_spec, text, "--device", "cuda")
    assert result.code == 0, result.out
    note = "--device cuda was asked for, but no CUDA device is available: fell back to cpu"
    assert any(note in n for n in report.notes), report.notes
    assert note in result.out and report.settings["device"] == "cpu"
    assert report.expectations[0].answer == "我学会了"

    skipped, report = run_one(sft, write_spec, text, "--device", "cuda", "--on-unsupported", "skip")
    assert skipped.code == 0 and report.outcome == "skipped"
    assert report.skip_reason == "--device cuda was asked for, but no CUDA device is available (--on-unsupported=skip)"

    failed, report = run_one(sft, write_spec, text, "--device", "cuda", "--on-unsupported", "error")
    assert failed.code == 1 and report.outcome == "error" and report.error.phase == "load"
    assert "pass --on-unsupported=fallback to run with cpu instead" in report.error.message


@pytest.mark.parametrize("quantization,described", [
    ("", "4-bit nf4, compute float32 (bitsandbytes "),
    ("quantization: {load_in_8bit: true}\n", "8-bit LLM.int8 (bitsandbytes "),
], ids=["4bit", "8bit"])
def test_qlora_trains_quantized_layers_and_learns_the_answer(sft, write_spec, one_answer_spec, quantization,
                                                              described):
    # bitsandbytes is a dependency and has a CPU backend: quantized loading must work here, never skip.
    text = quantization + one_answer_spec(method="qlora").replace("expect:", "checks: {roundtrip: true}\nexpect:")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, report = run_one(sft, write_spec, text)
    assert result.code == 0, result.out
    assert report.settings["quantization"].startswith(described)
    assert report.expectations[0].base_answer != "我学会了"
    assert report.expectations[0].answer == "我学会了"
    # Saved, reloaded onto a fresh quantized base, and merged into the base loaded without quantization
    # (what is deployed): the adapter gives the same answer.
    check = report.training_checks[0].checks[0]
    assert check.passed, check.message
    assert "merged into the unquantized base" in check.message
    assert not report.notes
    # On a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights for an inference kernel without an
    # autograd formula; training through it would be "silently incorrect". It must not happen anywhere.
    assert not [w for w in caught if "autograd kernel was not registered" in str(w.message)]


def test_4bit_layers_keep_their_standard_layout_after_generation(prepare):
    """The layout test behind the one above, on its own: eval-mode generation must not repack the weights
    (it does by default on AVX512-BF16 CPUs), whatever this CPU has."""
    import torch

    item, run = prepare("model: builtin:tiny-gemma\nmethod: qlora\nchecks: {loss_decreased: true}\n"
                        "data: {conversations: [[{role: user, content: a}, {role: assistant, content: b}]]}\n")
    layers = [m for m in run.model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    with torch.no_grad():
        run.model(torch.tensor([[2, 10, 11]]))
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


def test_bitsandbytes_message_about_the_kernels_hub_package_is_dropped():
    import logging

    from bitsandbytes.backends.cpu import ops

    import sft_spec_plugins.model.device  # noqa: F401 - installs the filter

    message = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'."
    record = ops.logger.makeRecord(ops.logger.name, logging.WARNING, __file__, 1, message, (), None)
    assert not ops.logger.filter(record)
    other = ops.logger.makeRecord(ops.logger.name, logging.WARNING, __file__, 1, "something else", (), None)
    assert ops.logger.filter(other)


def break_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError


def test_qlora_without_4bit_support_falls_back_to_lora_skips_or_fails(sft, write_spec, one_answer_spec, monkeypatch):
    break_bitsandbytes(monkeypatch)
    text = one_answer_spec(method="qlora")
    result, report = run_one(sft, write_spec, text)
    assert result.code == 0, result.out
    (note,) = [n for n in report.notes if n.startswith("qlora:")]
    assert note.startswith("qlora: 4-bit loading does not work on this machine (cpu; ModuleNotFoundError")
    assert note.endswith("fell back to LoRA on the unquantized model (--on-unsupported=fallback)")
    assert "quantization" not in report.settings and report.method == "qlora"
    assert report.expectations[0].answer == "我学会了"

    skipped, report = run_one(sft, write_spec, text, "--on-unsupported", "skip")
    assert report.outcome == "skipped" and report.skip_reason.startswith("qlora: 4-bit loading does not work")
    failed, report = run_one(sft, write_spec, text, "--on-unsupported", "error")
    assert failed.code == 1 and "run with LoRA on the unquantized model instead" in report.error.message


def test_8bit_optimizer_without_bitsandbytes_falls_back_to_adamw_torch(sft, write_spec, one_answer_spec, monkeypatch):
    break_bitsandbytes(monkeypatch)
    text = one_answer_spec(method="lora").replace("per_device_train_batch_size: 8", "optim: adamw_8bit")
    result, report = run_one(sft, write_spec, text)
    assert result.code == 0, result.out
    assert report.settings["training"]["optim"] == "adamw_torch"
    note = "optim=adamw_8bit needs bitsandbytes (ModuleNotFoundError"
    assert any(n.startswith(note) for n in report.notes), report.notes


def test_torchao_8bit_adamw_is_not_mistaken_for_a_bitsandbytes_optimizer():
    from sft_spec_plugins.model.device import BITSANDBYTES_OPTIMIZERS, PAGED_TO_UNPAGED

    assert "adamw_torch_8bit" not in BITSANDBYTES_OPTIMIZERS and "galore_adamw_8bit" not in BITSANDBYTES_OPTIMIZERS
    from transformers.training_args import OptimizerNames

    names = {o.value for o in OptimizerNames}
    assert BITSANDBYTES_OPTIMIZERS <= names and set(PAGED_TO_UNPAGED.values()) <= names


def test_paged_optimizer_off_cuda_runs_unpaged_and_says_so(sft, write_spec, one_answer_spec):
    pytest.importorskip("bitsandbytes")
    text = one_answer_spec(method="lora").replace("per_device_train_batch_size: 8", "optim: paged_adamw_8bit")
    result, report = run_one(sft, write_spec, text, "--device", "cpu")
    assert result.code == 0, result.out
    assert report.settings["training"]["optim"] == "adamw_8bit"
    assert "optim=paged_adamw_8bit pages optimizer state through CUDA memory, and this run is on cpu: fell back " \
           "to adamw_8bit (--on-unsupported=fallback)" in report.notes


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_weights_on_a_cpu_follow_its_bf16_support(sft, write_spec, one_answer_spec, monkeypatch, native):
    monkeypatch.setattr("sft_spec_plugins.model.device.cpu_has_native_bf16", lambda: native)
    text = one_answer_spec(method="lora", epochs=2).replace(
        "model: builtin:tiny-gemma", "model: {id: 'builtin:tiny-gemma', dtype: bfloat16}")
    result, report = run_one(sft, write_spec, text, "--device", "cpu", name=f"bf16-{native}.sft.yaml")
    assert report.outcome in ("passed", "failed"), result.out  # 2 epochs: trained, not necessarily learnt
    if native:
        assert report.settings["dtype"] == "bfloat16" and not report.notes
    else:
        assert report.settings["dtype"] == "float32"
        assert report.notes == ["model bfloat16 weights are emulated on this CPU (no native bf16 support): fell back "
                                "to float32 weights (--on-unsupported=fallback)"]


def test_float16_weights_on_a_cpu_are_trained_in_float32(sft, write_spec, one_answer_spec):
    text = one_answer_spec(method="lora").replace(
        "model: builtin:tiny-gemma", "model: {id: 'builtin:tiny-gemma', dtype: float16}")
    result, report = run_one(sft, write_spec, text, "--device", "cpu")
    assert result.code == 0, result.out
    assert report.settings["dtype"] == "float32"
    assert any(n.startswith("model float16 weights need a GPU") for n in report.notes), report.notes


def test_checkpointing_a_model_that_cannot_falls_back_to_off(sft, write_spec, one_answer_spec, monkeypatch):
    from transformers import GemmaForCausalLM

    monkeypatch.setattr(GemmaForCausalLM, "supports_gradient_checkpointing", False)
    text = one_answer_spec(method="lora", epochs=2).replace("per_device_train_batch_size: 8",
                                                           "activation_checkpointing: true")
    result, report = run_one(sft, write_spec, text)
    assert report.outcome in ("passed", "failed"), result.out
    assert report.settings["training"]["activation_checkpointing"] is False
    assert any("GemmaForCausalLM does not support gradient checkpointing: fell back to "
               "activation_checkpointing=False" in n for n in report.notes), report.notes


def test_precision_transformers_refuses_falls_back_to_fp32(sft, write_spec, one_answer_spec, monkeypatch):
    # The message SFTConfig gives on a machine without bf16 support (see the field notes).
    from trl import SFTConfig

    original = SFTConfig.__post_init__

    def refuse_bf16(self):
        if self.bf16:
            raise ValueError("Your setup doesn't support bf16/gpu. You need to assign use_cpu if you want to train "
                             "the model on CPU.")
        original(self)

    monkeypatch.setattr(SFTConfig, "__post_init__", refuse_bf16)
    monkeypatch.setattr("sft_spec_plugins.train.trainer.cpu_has_native_bf16", lambda: True)  # so our own check keeps it
    text = one_answer_spec(method="lora").replace("per_device_train_batch_size: 8", "bf16: true")
    result, report = run_one(sft, write_spec, text, "--device", "cpu")
    assert result.code == 0, result.out
    assert report.settings["training"]["bf16"] is False
    (note,) = report.notes  # and no word of bf16 autocast, which did not happen
    assert note.startswith("the recipe's precision settings do not work on cpu (Your setup doesn't support bf16")
    assert note.endswith("fell back to fp32 (--on-unsupported=fallback)")
    skipped, report = run_one(sft, write_spec, text, "--device", "cpu", "--on-unsupported", "skip")
    assert report.outcome == "skipped"
