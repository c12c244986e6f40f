"""The model phase: which loader loads a spec's model, and one loaded base model shared by the specs.

Specs that use the same base model (same id, device and quantization) share one loaded copy: LoRA specs
remove their adapters afterwards, and a spec that changes the weights (full fine-tune, k-bit
preparation) marks it dirty so the next spec loads it fresh. What a spec may change without saying so
(peft's ``modules_to_save`` kept by ``unload()``, PiSSA's rewrite of the base weights, TRL setting the
tokenizer's chat template or EOS token) is caught by a fingerprint of the weights, buffers, config and
tokenizer taken at load and compared after every spec: a difference marks the model dirty too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sft_spec import hookimpl
from sft_spec.errors import SkipSpec, SpecError, SpecTimeout
from sft_spec.loading.expectations import plugin_validate
from sft_spec.loading.paths import check_inside
from sft_spec.state import LoadedModel, StashKey

from .device import (
    bitsandbytes_problem,
    dtype_problem,
    keep_standard_4bit_layout,
    pick_device,
    session_device,
    unsupported,
)
from .pretrained import quiet_libraries


@dataclass
class ModelCache:
    """The base model loaded for this run (one at a time: a suite moves from base model to base model)."""

    key: str = ""
    loaded: LoadedModel | None = None
    fingerprint: dict | None = None
    loads: int = 0


#: The run's shared base model.
MODEL_CACHE = StashKey[ModelCache]()


@hookimpl
def sft_spec_addoption(parser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                        help="where to train (default: cuda when present, else cpu)")
    parser.add_argument("--allow-remote-code", action="store_true",
                        help="let specs that ask for trust_remote_code run the model repository's code")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow pickle-based checkpoints (.bin); safetensors only by default")


@hookimpl
def sft_spec_validate_spec(item, config) -> list[SpecError]:
    """A registered loader claims ``model.id`` and accepts it (cheap: no torch, no download)."""
    model = item.spec.model
    written_as_mapping = isinstance((item.doc.data if item.doc else {}).get("model"), dict)
    where = item.locate("model", "id") if written_as_mapping else item.locate("model")
    loader = config.registry.loader_for(model)
    if loader is None:
        return [SpecError(f"no model loader accepts {model.id!r}", where, key="model")]
    problem = plugin_validate(getattr(loader.obj, "validate", None), model, "the model loader")
    return [SpecError(problem, where, key="model")] if problem else []


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


#: TRL's settings that change the tokenizer (SFTTrainer would change the shared one, after formatting).
TOKENIZER_SETTINGS = ("eos_token", "pad_token", "chat_template_path")


def _tokenizer_settings(item) -> dict:
    return {k: item.spec.training[k] for k in TOKENIZER_SETTINGS if item.spec.training.get(k) is not None}


def _cache_key(item, device: str, quantized: bool) -> str:
    from ..common.files import named_files

    spec = item.spec
    files = named_files(item)  # a template file's contents, not its name: two folders may hold one name
    settings = {k: files.get(k, v) for k, v in _tokenizer_settings(item).items()}
    return json.dumps([spec.model.model_dump(), device, quantized, spec.quantization, settings],
                      sort_keys=True, default=str)


def _apply_tokenizer_settings(item, loaded: LoadedModel) -> None:
    """``training.eos_token``/``pad_token``/``chat_template_path`` on this load's own tokenizer, before anything
    is formatted, and the model's token ids with them, as SFTTrainer would set them (too late, and on a
    tokenizer other specs share)."""
    tokenizer, model = loaded.tokenizer, loaded.model
    for key, value in _tokenizer_settings(item).items():
        where = item.locate("training", key)
        if key == "chat_template_path":
            tokenizer.chat_template = check_inside(item.folder, value, "training.chat_template_path").read_text(
                encoding="utf-8")
            loaded.notes.append(f"{where}: note: training.chat_template_path is this spec's chat template")
            continue
        if value not in tokenizer.get_vocab():
            raise SpecError(f"{key} {value!r} is not in the tokenizer's vocabulary", where, key=f"training.{key}")
        setattr(tokenizer, key, value)
        token_id = tokenizer.convert_tokens_to_ids(value)
        setattr(model.config, f"{key}_id", token_id)
        generation = getattr(model, "generation_config", None)
        if generation is not None and key == "eos_token":
            ids = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
            generation.eos_token_id = [token_id, *(i for i in ids if i is not None and i != token_id)]
        elif generation is not None:
            generation.pad_token_id = token_id
        loaded.notes.append(f"{where}: note: training.{key} {value!r} is set on this spec's own tokenizer")


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
        try:
            quantization = quantization_config(item, device)
        except (ValueError, TypeError) as exc:  # the spec's values, not this machine: never a fallback
            raise SpecError(f"quantization: {exc}", item.locate("quantization"), key="quantization") from None
        try:
            loaded = named.obj.load(item.spec.model, config, quantization=quantization)
        except (SpecError, SkipSpec):
            raise
        except Exception as exc:  # noqa: BLE001 - bitsandbytes has no backend for this device, or no kernel
            problem = f"{type(exc).__name__}: {exc}"
        else:
            keep_standard_4bit_layout(loaded.model)
            loaded.quantization = _describe(quantization)
            return loaded
    bits = "8-bit" if item.spec.quantization.get("load_in_8bit") else "4-bit"
    notes.append(unsupported(config, f"qlora: {bits} loading does not work on this machine ({device}; {problem})",
                             "LoRA on the unquantized model"))
    return None


def _train_ready_dtype(loaded: LoadedModel, config, notes: list[str]) -> None:
    """Weights the device computes in slowly or unsafely (bf16 without native support, fp16 on a CPU)."""
    import torch

    if loaded.quantization:
        return  # the 4-bit layers' compute dtype was chosen for the device already
    dtype = next((p.dtype for p in loaded.model.parameters() if p.is_floating_point()), None)
    problem = dtype_problem(dtype, loaded.device)
    if problem:
        notes.append(unsupported(config, f"model {problem}", "float32 weights"))
        loaded.model.to(torch.float32)
        loaded.dtype = "float32"


#: Up to this many bytes of weights are hashed whole after every spec; a larger model is sampled (every
#: tensor's storage and in-place version counter, and a few thousand of its values), so the check stays
#: a fraction of a second (hashing runs at about 1 GB/s on one core).
EXACT_BYTES = 512 * 1024 * 1024


def _tensor_bytes(tensor, exact: bool) -> bytes:
    import torch

    data = tensor.detach()
    if not exact:
        flat = data.reshape(-1)
        data = flat[:: max(1, flat.numel() // 4096)]
    data = data.contiguous().cpu()
    # As raw bits, whatever the dtype (bf16, fp8, bool have no numpy type of their own).
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[data.element_size()]
    return (data.to(torch.uint8) if data.dtype == torch.bool else data).view(as_int).numpy().tobytes()


def fingerprint(loaded: LoadedModel) -> dict:
    """What a spec must leave as it found it: the weights and buffers (hashed, see EXACT_BYTES), which module
    is where and what is hooked onto it (peft layers left behind, gradient checkpointing), the model's
    config and generation config, and the tokenizer's template, special tokens and vocabulary size."""
    import hashlib

    model, tokenizer = loaded.model, loaded.tokenizer
    tensors = [*model.named_parameters(), *model.named_buffers()]
    exact = sum(t.numel() * t.element_size() for _, t in tensors) <= EXACT_BYTES
    weights = hashlib.blake2b(digest_size=16)
    for name, tensor in tensors:
        weights.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if not exact:  # sampled values: any in-place write or swapped tensor counts as a change (safe side)
            weights.update(f"{tensor.data_ptr()}:{tensor._version}".encode())
        weights.update(_tensor_bytes(tensor, exact))
    modules = hashlib.blake2b(digest_size=16)
    for name, module in model.named_modules():
        hooks = [len(getattr(module, attr, {}) or {}) for attr in ("_forward_hooks", "_forward_pre_hooks",
                                                                   "_backward_hooks")]
        modules.update(f"{name}:{type(module).__name__}:{hooks}:"
                       f"{getattr(module, 'gradient_checkpointing', None)}".encode())
    config = getattr(model, "config", None)
    generation = getattr(model, "generation_config", None)
    return {
        "weights": weights.hexdigest(),
        "modules": modules.hexdigest(),
        "config": config.to_json_string(use_diff=False) if config is not None else "",
        "generation_config": generation.to_json_string(use_diff=False) if generation is not None else "",
        "chat_template": str(getattr(tokenizer, "chat_template", None)),
        "special_tokens": json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str),
        "vocabulary": len(tokenizer),
        "padding_side": getattr(tokenizer, "padding_side", None),
    }


@hookimpl(trylast=True)
def sft_spec_load_model(item, config) -> LoadedModel:
    quiet_libraries(config.getoption("verbose", 0))
    named = config.registry.loader_for(item.spec.model)
    if named is None:
        raise SpecError(f"no model loader accepts {item.spec.model.id!r}")
    device, device_note = session_device(config)
    cache = config.stash.setdefault(MODEL_CACHE, ModelCache())
    key = _cache_key(item, device, item.spec.method == "qlora")
    if cache.key == key and cache.loaded is not None and not cache.loaded.dirty:
        return cache.loaded
    cache.loaded = cache.fingerprint = None  # one model in memory at a time
    notes = [device_note] if device_note else []
    loaded = _load_quantized(named, item, config, device, notes) if item.spec.method == "qlora" else None
    if loaded is None:
        loaded = named.obj.load(item.spec.model, config, quantization=None)
    _train_ready_dtype(loaded, config, notes)
    _apply_tokenizer_settings(item, loaded)
    # Every spec that shares this model reports what was changed to load it.
    loaded.notes.extend(n for n in notes if n not in loaded.notes)
    loaded.loader = named.name
    cache.key, cache.loaded, cache.loads = key, loaded, cache.loads + 1
    cache.fingerprint = fingerprint(loaded)
    loaded.after_run.append(_check_unchanged)
    return loaded


def _check_unchanged(run) -> None:
    """After a spec (its finalizers removed its adapter): a shared model that differs from its load-time
    fingerprint is marked dirty, so the next spec gets a fresh load instead of what this one left."""
    cache = run.config.stash.get(MODEL_CACHE, None)
    loaded = cache.loaded if cache is not None else None
    if loaded is None or loaded.dirty or cache.fingerprint is None:
        return
    try:
        now = fingerprint(loaded)
    except (Exception, SpecTimeout) as exc:  # noqa: BLE001 - unsure is dirty: the next spec loads afresh
        loaded.dirty = True
        run.note(f"the shared base model could not be checked ({type(exc).__name__}): the next spec loads it fresh")
        return
    changed = [name for name in now if now[name] != cache.fingerprint[name]]
    if changed:
        loaded.dirty = True
        run.note(f"this spec changed the shared base model ({', '.join(changed)}): the next spec loads it fresh")


@hookimpl
def sft_spec_cache_key(item, config):
    """The model's identity (a local folder's files can change under one name), the device it runs on,
    and the permissions that decide whether it may load at all: a result passed under one must not be
    reused under a stricter one (no --allow-remote-code)."""
    return {"model": model_identity(item), "device": device_without_torch(config.getoption("device", "auto")),
            "allow_remote_code": bool(config.getoption("allow_remote_code", False)),
            "allow_pickle": bool(config.getoption("allow_pickle", False))}


def model_identity(item):
    """What names the model's weights beyond its id: the builder's version for a built-in, the files' sizes
    and times for a local folder, the revision for a hub id."""
    model = item.spec.model
    if model.id.startswith("builtin:"):
        from .builtin_models import BUILD_VERSION

        return ["builtin", BUILD_VERSION]
    folder = Path(model.id).expanduser()
    if folder.exists():  # a local folder or file: its contents may change under the same name
        files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
        return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return ["hub", model.revision]
