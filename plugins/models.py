"""Model loaders: ``builtin:`` tiny models and Hugging Face model directories or hub ids.

Loaded models are kept for the run and shared by the specs that use the same base model: LoRA specs
remove their adapters afterwards, and a spec that changes the weights (full fine-tune, QLoRA) marks
the model dirty so the next spec loads it fresh.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sft_spec import hookimpl
from sft_spec.errors import SkipSpec, SpecError
from sft_spec.runner import LoadedModel

from .builtin_models import BUILTIN_MODELS, builtin_model_dir
from .gguf import PACKAGED_MODELS  # builtin: names of real models, served by the gguf loader
from .support import (
    bitsandbytes_problem,
    dtype_problem,
    keep_standard_4bit_layout,
    pick_device,
    session_device,
    unsupported,
)

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


def device_without_torch(requested: str) -> str:
    """The device ``pick_device`` would choose, without importing torch where that can be told.

    A result-cache hit must cost a fraction of a second, and importing torch alone takes two.
    """
    import sys
    from importlib import metadata

    if requested not in ("auto", None):
        return requested
    try:
        build = metadata.version("torch")
    except metadata.PackageNotFoundError:
        build = ""
    if build.endswith("+cpu"):
        return "cpu"
    dev = Path("/dev")
    if sys.platform == "linux" and not any(dev.glob("nvidia[0-9]*")) and not (dev / "kfd").exists():
        return "cpu"  # no GPU device nodes: torch.cuda.is_available() would be False
    return pick_device(requested)


def _dtype(name: str):
    import torch

    return {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class BuiltinLoader:
    """``builtin:NAME``: tiny random models built offline on first use and cached."""

    def claims(self, model_spec) -> bool:
        name = model_spec.id[len(BUILTIN_PREFIX):]
        return model_spec.id.startswith(BUILTIN_PREFIX) and name not in PACKAGED_MODELS

    def validate(self, model_spec) -> str | None:
        from sft_spec.errors import did_you_mean

        name = model_spec.id[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            return did_you_mean(name, [*BUILTIN_MODELS, *PACKAGED_MODELS], "builtin model")
        return None

    def load(self, model_spec, config, *, quantization=None) -> LoadedModel:
        name = model_spec.id[len(BUILTIN_PREFIX):]
        directory = builtin_model_dir(name, Path(config.cache_dir))
        return load_pretrained(str(directory), model_spec, config, quantization=quantization,
                               source=f"{model_spec.id} ({BUILTIN_MODELS[name]})")


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
                       info={"dtype": str(next(model.parameters()).dtype).replace("torch.", "")})


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


def _cache_key(item, device: str, quantized: bool) -> str:
    spec = item.spec
    return json.dumps([spec.model.model_dump(), device, quantized, spec.quantization], sort_keys=True, default=str)


@hookimpl(trylast=True)
def sft_spec_register_model_loaders(register) -> None:
    register("builtin", BuiltinLoader(), "tiny random models that need no download: " + ", ".join(
        f"builtin:{n}" for n in BUILTIN_MODELS))
    register("pretrained", PretrainedLoader(), "local directories and Hugging Face Hub ids (from_pretrained)")


def quantization_config(item, device: str):
    """BitsAndBytesConfig for qlora: nf4 4-bit by default, the spec's ``quantization`` keys on top."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    settings = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute,
                "bnb_4bit_use_double_quant": True}
    if item.spec.quantization.get("load_in_8bit"):
        settings = {}  # 8-bit instead: the 4-bit defaults would contradict it
    settings.update(item.spec.quantization)
    return BitsAndBytesConfig(**settings)


def _describe(quantization) -> str:
    from importlib import metadata

    version = f"bitsandbytes {metadata.version('bitsandbytes')}"
    if quantization.load_in_8bit:
        return f"8-bit LLM.int8 ({version})"
    compute = str(quantization.bnb_4bit_compute_dtype).replace("torch.", "")
    return f"4-bit {quantization.bnb_4bit_quant_type}, compute {compute} ({version})"


def _load_quantized(named, item, config, device: str, notes: list[str]) -> LoadedModel | None:
    """qlora's quantized model; None, with the fallback noted, when quantized loading does not work here."""
    problem = bitsandbytes_problem()
    if problem is None:
        quantization = quantization_config(item, device)
        try:
            loaded = named.obj.load(item.spec.model, config, quantization=quantization)
        except (SpecError, SkipSpec):
            raise
        except Exception as exc:  # noqa: BLE001 - bitsandbytes has no backend for this device, or no kernel
            problem = f"{type(exc).__name__}: {exc}"
        else:
            keep_standard_4bit_layout(loaded.model)
            loaded.info["quantization"] = _describe(quantization)
            return loaded
    bits = "8-bit" if item.spec.quantization.get("load_in_8bit") else "4-bit"
    notes.append(unsupported(config, f"qlora: {bits} loading does not work on this machine ({device}; {problem})",
                             "LoRA on the unquantized model"))
    return None


def _train_ready_dtype(loaded: LoadedModel, config, notes: list[str]) -> None:
    """Weights the device computes in slowly or unsafely (bf16 without native support, fp16 on a CPU)."""
    import torch

    if loaded.info.get("quantization"):
        return  # the 4-bit layers' compute dtype was chosen for the device already
    dtype = next((p.dtype for p in loaded.model.parameters() if p.is_floating_point()), None)
    problem = dtype_problem(dtype, loaded.device)
    if problem:
        notes.append(unsupported(config, f"model {problem}", "float32 weights"))
        loaded.model.to(torch.float32)
        loaded.info["dtype"] = "float32"


@hookimpl(trylast=True)
def sft_spec_load_model(item, config) -> LoadedModel:
    quiet_libraries(config.getoption("verbose", 0))
    named = config.registry.loader_for(item.spec.model)
    if named is None:
        raise SpecError(f"no model loader accepts {item.spec.model.id!r}")
    device, device_note = session_device(config)
    quantized = item.spec.method == "qlora"
    cache: dict[str, LoadedModel] = config.stash.setdefault("models.loaded", {})
    key = _cache_key(item, device, quantized)
    loaded = cache.get(key)
    if loaded is not None and not loaded.info.get("dirty"):
        loaded.info["reused"] = True
        return loaded
    # Keep one model in memory at a time: a suite moves from base model to base model.
    cache.clear()
    notes = [device_note] if device_note else []
    loaded = _load_quantized(named, item, config, device, notes) if quantized else None
    if loaded is None:
        loaded = named.obj.load(item.spec.model, config, quantization=None)
    _train_ready_dtype(loaded, config, notes)
    # Every spec that shares this model reports what was changed to load it.
    loaded.notes.extend(n for n in notes if n not in loaded.notes)
    loaded.info["loader"] = named.name
    loaded.info["loads"] = config.stash.setdefault("models.load_count", 0) + 1
    config.stash["models.load_count"] = loaded.info["loads"]
    cache[key] = loaded
    return loaded
