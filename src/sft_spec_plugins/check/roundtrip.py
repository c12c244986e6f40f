"""Adapter round trip: ``checks: {roundtrip: true}`` on LoRA/QLoRA specs.

What a user ships is the saved adapter, not the model in memory. After training, the adapter is saved
(safetensors) to the spec's output folder, loaded onto a fresh base model (the model loader's own
load, not the run's shared cached model), and that copy is then merged (``merge_and_unload``); a QLoRA
adapter is merged into the base loaded without quantization instead, which is what is deployed (merging
into 4-bit weights rounds the sum back to 4 bits). The greedy answers of the trained model, the reloaded
adapter and the merged model must be identical on every expectation prompt; the check names each prompt
where they differ.

The work happens in ``sft_spec_after_training``, while the adapter is still attached (the LoRA finalizer
removes it later); the check reads that result when the check phase asks for it.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Any

from sft_spec import hookimpl
from sft_spec.registry import Check, CheckContext, CheckResult
from sft_spec.state import StashKey

from ..common.files import spec_output_dir

#: The round trip's verdict for the spec that runs: passed, and the message that says why.
RESULT = StashKey[CheckResult]()


def _valid(value: Any) -> str | None:
    return None if value is True else f"roundtrip: expected true, got {value!r}"


def roundtrip(_: str, __: Any, ctx: CheckContext) -> CheckResult:
    result = ctx.run.stash.get(RESULT, None) if ctx.run is not None else None
    return result or CheckResult(False, "the adapter round trip did not run (the trained model answered no prompt)")


@hookimpl
def sft_spec_register_checks(register) -> None:
    register(Check("roundtrip", roundtrip, "true (lora/qlora): the saved adapter, reloaded on a fresh base and "
                   "merged, gives the same greedy answers as the trained model", _valid, scope="training"))


def _wants(item) -> bool:
    return any(check.name == "roundtrip" for check in item.selected_training_checks)


@hookimpl
def sft_spec_validate_spec(item, config) -> list[str] | None:
    if not any(check.name == "roundtrip" for check in item.training_checks):
        return None
    problems = []
    if item.spec.method == "full":
        problems.append("checks.roundtrip needs method lora or qlora (a full fine-tune has no adapter to save)")
    if not item.expectations:
        problems.append("checks.roundtrip compares answers on the expect prompts: add at least one expectation")
    return problems


@hookimpl
def sft_spec_after_training(item, run) -> None:
    if not _wants(item) or item.spec.method == "full" or not run.answers:
        return
    try:
        run.stash[RESULT] = _round_trip(item, run)
    except Exception as exc:  # noqa: BLE001 - the check fails with the reason; the spec's other results stand
        run.stash[RESULT] = CheckResult(False, f"round trip failed: {type(exc).__name__}: {exc}")


def _merge_dtype(quantization, device: str):
    """The dtype a QLoRA user merges into: 4-bit's compute dtype; for 8-bit, fp32 on a CPU, else fp16."""
    import torch

    if quantization.load_in_4bit:
        return quantization.bnb_4bit_compute_dtype
    return torch.float32 if device == "cpu" else torch.float16


def _round_trip(item, run) -> CheckResult:
    import torch
    from peft import PeftModel

    from ..model.device import keep_standard_4bit_layout
    from ..model.models import quantization_config

    config = run.config
    expectations = item.selected_expectations
    answers = [run.answers[e.index] for e in expectations]
    folder = spec_output_dir(config, item, "adapter")
    run.model.save_pretrained(str(folder), safe_serialization=True)
    if not (folder / "adapter_model.safetensors").is_file():
        return CheckResult(False, f"no adapter_model.safetensors was written to {folder}")
    named = config.registry.loader_for(item.spec.model)
    # The same device and quantization as the trained model, fallbacks included.
    quantization = quantization_config(item, run.loaded.device) if run.loaded.quantization else None
    fresh = named.obj.load(item.spec.model, config, quantization=quantization)
    if quantization is not None:
        keep_standard_4bit_layout(fresh.model)  # as the trained model: the same kernels on every CPU
    elif run.loaded.dtype:
        fresh.model.to(getattr(torch, run.loaded.dtype))  # e.g. bf16 weights the run moved to fp32
    try:
        reloaded = PeftModel.from_pretrained(fresh.model, str(folder))
        reloaded.eval()
        hook = config.hook
        reloaded_answers = hook.sft_spec_generate(item=item, run=dataclasses.replace(run, model=reloaded),
                                                  prompts=run.prompts, when="after")
        if quantization is not None:
            # What a QLoRA user deploys: the adapter merged into the base loaded without quantization
            # (merging into 4-/8-bit weights rounds the sum back to 4 or 8 bits, and is never shipped).
            plain = named.obj.load(item.spec.model, config, quantization=None)
            plain.model.to(_merge_dtype(quantization, run.loaded.device))
            merged = PeftModel.from_pretrained(plain.model, str(folder)).merge_and_unload()
            merged_into = "merged into the unquantized base"
        else:
            merged = reloaded.merge_and_unload()  # on the fresh copy: the shared base never holds merged weights
            merged_into = "merged"
        merged.eval()
        merged_answers = hook.sft_spec_generate(item=item, run=dataclasses.replace(run, model=merged),
                                                prompts=run.prompts, when="after")
    finally:
        del fresh
        gc.collect()
    differences = []
    for exp, trained, again, merged_one in zip(expectations, answers, reloaded_answers, merged_answers, strict=True):
        if trained.text == again.text == merged_one.text:
            continue
        shown = exp.prompt[-1]["content"]
        differences.append(f"{shown!r}: trained {trained.text!r}, reloaded {again.text!r}, "
                           f"{merged_into} {merged_one.text!r}")
    if differences:
        return CheckResult(False, f"{len(differences)} of {len(answers)} prompts differ: " + "; ".join(differences))
    return CheckResult(True, f"saved, reloaded and {merged_into} adapter agree on {len(answers)} prompts")
