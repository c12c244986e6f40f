"""On a CUDA GPU the reference recipe's settings run natively: no fallback, bf16, adamw_8bit, 4-bit QLoRA.

Deselected by default (``-m gpu``); ``scripts/gpu-check.sh`` runs them on a GPU machine. Everything
here also runs with ``--on-unsupported error``, so a setting that silently fell back would fail twice.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def test_reference_recipe_settings_run_natively_on_cuda(sft):
    import torch

    result = sft("run", REPO / "examples" / "cuda", "-v", "--device", "cuda", "--on-unsupported", "error",
                 "--no-cache")
    assert result.code == 0, result.out
    reports = {r.variant: r for r in result.recorder.reports}
    assert set(reports) == {"lora-bf16-adamw8bit", "qlora-nf4", "full-bf16-adamw8bit"}
    for report in reports.values():
        assert report.settings["device"] == "cuda", report.settings
        assert not [n for n in report.notes if "fell back" in n], report.notes
        assert report.expectations[0].base_answer != "我学会了" and report.expectations[0].answer == "我学会了"
    for variant in ("lora-bf16-adamw8bit", "full-bf16-adamw8bit"):
        training = reports[variant].settings["training"]
        assert training["bf16"] is True and training["optim"] == "adamw_8bit" and "use_cpu" not in training
    compute = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    assert reports["qlora-nf4"].settings["quantization"].startswith(f"4-bit nf4, compute {compute} (bitsandbytes ")


def test_default_suite_passes_on_cuda(sft):
    result = sft("run", REPO / "specs", "--device", "cuda", "--on-unsupported", "error", "--no-cache")
    # The loss baseline in specs/ was recorded on a CPU: on a GPU it reports itself stale (device
    # cpu -> cuda), which is what it is for; every other check must pass.
    failed = [c.nodeid for r in result.recorder.reports for c in r.cases
              if c.outcome != "passed" and not c.nodeid.endswith("checks[loss_baseline]")]
    assert failed == [], result.out
