"""What this machine can run, and what ``--on-unsupported`` does about a setting it cannot.

Every setting a spec or the command line asks for that the device cannot run (a missing GPU, fp16 or
emulated bf16 on a CPU, 4-bit loading without a bitsandbytes backend, paged optimizers without CUDA)
goes through :func:`unsupported`: fall back to the nearest setting that works and write a note into
every report (the default), skip the spec with the reason, or fail it.
"""

from __future__ import annotations

import logging

from sft_spec.errors import SkipSpec, SpecError

POLICIES = ("fallback", "skip", "error")


def unsupported(config, problem: str, nearest: str) -> str:
    """Apply the ``--on-unsupported`` policy; on fallback, return the note that says what changed.

    The caller makes the change after this returns: skip and error raise before anything changes.
    """
    policy = config.getoption("on_unsupported", "fallback") or "fallback"
    if policy == "skip":
        raise SkipSpec(f"{problem} (--on-unsupported=skip)")
    if policy == "error":
        raise SpecError(f"{problem}; pass --on-unsupported=fallback to run with {nearest} instead")
    return f"{problem}: fell back to {nearest} (--on-unsupported=fallback)"


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: without them PyTorch emulates bf16 matmuls (measured 4x slower than fp32)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def device_available(device: str) -> bool:
    import torch

    if device == "cuda":
        return torch.cuda.is_available()
    if device == "mps":
        return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    return device == "cpu"


def pick_device(requested: str | None) -> str:
    """``auto``: CUDA when there is one, else the CPU. An explicit device is returned as asked."""
    if requested in ("auto", None, ""):
        return "cuda" if device_available("cuda") else "cpu"
    return requested


def session_device(config) -> tuple[str, str | None]:
    """The device this run trains on, and the note to report when it is not the one ``--device`` asked for.

    Raises ``SkipSpec`` or ``SpecError`` for every spec when the policy is skip or error.
    """
    requested = config.getoption("device", "auto") or "auto"
    device = pick_device(requested)
    if device_available(device):
        return device, None
    name = {"cuda": "CUDA", "mps": "MPS"}.get(device, device)
    note = unsupported(config, f"--device {device} was asked for, but no {name} device is available", "cpu")
    return "cpu", note


def dtype_problem(dtype, device: str) -> str | None:
    """Why weights of ``dtype`` cannot be trained well on ``device``, or None when they can."""
    import torch

    if dtype == torch.float16 and device == "cpu":
        return "float16 weights need a GPU (fp16 training on a CPU has no loss scaling and is slow)"
    if dtype == torch.bfloat16:
        if device == "cpu" and not cpu_has_native_bf16():
            return "bfloat16 weights are emulated on this CPU (no native bf16 support)"
        if device == "cuda" and not torch.cuda.is_bf16_supported():
            return "bfloat16 weights are not supported by this GPU"
    return None


#: bitsandbytes' paged optimizers (transformers ``optim`` names) and the unpaged one nearest to each.
PAGED_TO_UNPAGED = {
    "paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw_torch",
    "paged_lion_8bit": "lion_8bit", "paged_lion_32bit": "lion_32bit",
    "paged_ademamix_8bit": "ademamix_8bit", "paged_ademamix_32bit": "ademamix",
}
#: The ``optim`` names transformers builds from bitsandbytes (not torchao's adamw_torch_8bit, nor GaLore's).
BITSANDBYTES_OPTIMIZERS = frozenset({
    "adamw_bnb_8bit", "adamw_8bit", "ademamix", "ademamix_8bit", "lion_8bit", "lion_32bit",
    "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", *PAGED_TO_UNPAGED,
})


class _KernelsHubMessage(logging.Filter):
    """Drops bitsandbytes' import-time "Failed to load CPU gemm_4bit_forward from kernels-community".

    On CPUs with AVX512-BF16, bitsandbytes 0.50 looks for a fused 4-bit kernel that the optional
    ``kernels`` package would download from the Hugging Face Hub. sft-spec never uses that kernel (see
    :func:`keep_standard_4bit_layout`), and no hub is reachable from a CI runner, so the message only
    misleads. Installed before bitsandbytes is imported: the logger is the one its module asks for.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KernelsHubMessage())


def keep_standard_4bit_layout(model) -> int:
    """Keep bitsandbytes' 4-bit layers in their standard layout on every CPU; returns how many were changed.

    On a CPU with AVX512-BF16 (not on one with AVX2 only), bitsandbytes 0.50 repacks a ``Linear4bit``
    layer's weights in place, at its first forward in eval mode, into a layout for a bf16 inference
    kernel. The base answers are generated in eval mode before training, so training then backpropagates
    through that kernel, which has no autograd formula (torch warns "silently incorrect behavior"), and
    peft's merge dequantizes the repacked bytes as if they were standard ones (garbage). Turned off, the
    layers compute the same way on every CPU: dequantize, then matmul in the compute dtype.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot be used here, or None when it imports."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure (missing, no backend) means no bitsandbytes
        return f"{type(exc).__name__}: {exc}"
    return None
