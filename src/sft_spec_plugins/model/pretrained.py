"""Loading a Hugging Face model directory or hub id with the safety rules, for every loader.

No remote code unless the run allows it (``--allow-remote-code``), safetensors unless the run allows
pickle (``--allow-pickle``), and a quick offline probe instead of transformers' minute of retries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft_spec import hookimpl
from sft_spec.errors import SpecError
from sft_spec.state import LoadedModel

from .device import session_device

BUILTIN_PREFIX = "builtin:"


def quiet_libraries(verbosity: int) -> None:
    """Progress bars and info logs of transformers/datasets would drown the report; -vv shows them."""
    if verbosity >= 2:
        return
    import logging
    import warnings

    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|peft)\.")
    # bitsandbytes logs this on every 8-bit matmul; the report's settings name the quantization once.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _dtype(name: str):
    import torch

    return {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class PretrainedLoader:
    """A local model directory or a Hugging Face Hub id, loaded with ``from_pretrained``."""

    def claims(self, model_spec) -> bool:
        return not model_spec.id.startswith(BUILTIN_PREFIX) and not model_spec.id.endswith(".gguf") \
            and not model_spec.gguf_file

    def validate(self, model_spec) -> str | None:
        return None

    def load(self, model_spec, config, *, quantization=None) -> LoadedModel:
        return load_pretrained(model_spec.id, model_spec, config, quantization=quantization, source=model_spec.id)


def load_pretrained(location: str, model_spec, config, *, quantization=None, source: str = "",
                    extra_kwargs: dict[str, Any] | None = None) -> LoadedModel:
    """Load model and tokenizer with the safety rules: no remote code unless allowed, safetensors unless allowed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_spec.trust_remote_code and not config.getoption("allow_remote_code"):
        raise SpecError(f"model {model_spec.id!r} asks for trust_remote_code: this runs code from the model "
                        "repository; pass --allow-remote-code to allow it")
    device, _ = session_device(config)  # sft_spec_load_model reports a fallback
    kwargs: dict[str, Any] = {
        "revision": model_spec.revision,
        "trust_remote_code": model_spec.trust_remote_code,
        "dtype": _dtype(model_spec.dtype),
    }
    if not config.getoption("allow_pickle"):
        kwargs["use_safetensors"] = True
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": device if device != "cuda" else 0}
    kwargs.update(extra_kwargs or {})
    tokenizer_id = model_spec.tokenizer or location
    if not Path(location).exists() and not _in_local_cache(location, model_spec.revision) and not _hub_reachable():
        raise SpecError(_explain_load_error(location, OSError("the Hub cannot be reached from this machine"), config))
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_id, revision=model_spec.revision, trust_remote_code=model_spec.trust_remote_code,
            **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs and tokenizer_id == location else {}),
        )
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as exc:
        raise SpecError(_explain_load_error(location, exc, config)) from None
    if quantization is None:
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, source=source or location,
                       dtype=str(next(model.parameters()).dtype).replace("torch.", ""))


def _in_local_cache(repo_id: str, revision: str | None) -> bool:
    """True when the hub's local cache already holds the model's config (so it loads offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
        return isinstance(found, str)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect instead of transformers' retries, which take about a minute offline."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _explain_load_error(location: str, exc: OSError, config) -> str:
    text = str(exc)
    if Path(location).exists():
        if "safetensors" in text or "pytorch_model.bin" in text:
            return (f"cannot load model from {location}: no safetensors weights found; pickle checkpoints "
                    "(.bin) load only with --allow-pickle")
        return f"cannot load model from {location}: {text.splitlines()[0]}"
    looks_local = location.startswith((".", "/", "~")) or location.count("/") > 1
    if looks_local:
        return f"model directory not found: {location}"
    return (f"cannot load model {location!r}: it is not a local directory and the Hugging Face Hub is "
            f"unreachable or does not have it (offline?). Download it first, or point model.id at a "
            f"local directory. ({text.splitlines()[0][:200]})")


@hookimpl(trylast=True)
def sft_spec_register_model_loaders(register) -> None:
    register("pretrained", PretrainedLoader(), "local directories and Hugging Face Hub ids (from_pretrained)")
