"""The field lists of ``trl.SFTConfig`` and ``peft.LoraConfig``, for validating specs without torch.

Importing trl and peft takes seconds; validation must stay instant. The lists are computed once per
installed version of trl/transformers/peft and cached as JSON in the cache folder.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import types as types_module
import typing
from importlib import metadata
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text

#: Old names users bring from older TRL scripts, mapped to today's names.
#: A key is renamed only where the installed TRL has the new name.
RENAMED_TRAINING_KEYS = {
    "max_seq_length": "max_length",
    "evaluation_strategy": "eval_strategy",
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}

#: Settings sft-spec owns: where files go, and nothing is ever pushed to a hub from a spec.
MANAGED_TRAINING_KEYS = {
    "output_dir": "sft-spec writes run files under its own output folder",
    "logging_dir": "sft-spec writes run files under its own output folder",
    "push_to_hub": "a spec may not publish models",
    "hub_model_id": "a spec may not publish models",
    "hub_token": "a spec may not publish models",
    "hub_strategy": "a spec may not publish models",
    "hub_private_repo": "a spec may not publish models",
    "resume_from_checkpoint": "each run trains from the base model",
}

#: Collators removed from TRL, mapped to the sft-spec collator that re-creates them.
RENAMED_COLLATORS = {"DataCollatorForCompletionOnlyLM": "completion_only"}

# Fields of LoraConfig that sft-spec sets from the spec's method.
MANAGED_LORA_KEYS = {"task_type": "sft-spec trains causal language models (CAUSAL_LM)"}


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    name: str
    types: tuple[str, ...]  # subset of bool, int, float, str, list, dict, none, any
    choices: tuple[str, ...] = ()
    default: Any = None
    help: str = ""


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("trl", "transformers", "peft"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def _simple_types(hint: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    types: set[str] = set()
    choices: list[str] = []
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types_module.UnionType) else (hint,)
    for arg in args:
        origin = typing.get_origin(arg) or arg
        if arg is type(None):
            types.add("none")
        elif origin is typing.Literal:
            types.update(type(v).__name__ for v in typing.get_args(arg))
            choices.extend(str(v) for v in typing.get_args(arg))
        elif isinstance(origin, type) and issubclass(origin, enum.Enum):
            types.add("str")
            choices.extend(str(m.value) for m in origin)
        elif origin in (bool, int, float, str):
            types.add(origin.__name__)
        elif origin in (list, tuple, set):
            types.add("list")
        elif origin is dict:
            types.add("dict")
        else:
            types.add("any")
    return tuple(sorted(types)), tuple(dict.fromkeys(choices))


def _describe(cls: type) -> dict[str, FieldInfo]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        types, choices = _simple_types(hints.get(f.name, Any))
        default = f.default if f.default is not dataclasses.MISSING else None
        if not isinstance(default, str | int | float | bool | type(None)):
            default = repr(default) if not isinstance(default, enum.Enum) else default.value
        out[f.name] = FieldInfo(f.name, types, choices, default, str(f.metadata.get("help", ""))[:300])
    return out


def _compute() -> dict[str, dict[str, FieldInfo]]:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    # BitsAndBytesConfig is no dataclass: its fields are its constructor's keyword arguments.
    quantization = {
        name: FieldInfo(name, ("any",), (), None)
        for name in inspect.signature(BitsAndBytesConfig.__init__).parameters
        if name not in ("self", "kwargs")
    }
    return {"training": _describe(SFTConfig), "lora": _describe(LoraConfig), "quantization": quantization}


_memo: dict[str, dict[str, FieldInfo]] | None = None


def recipe_fields(cache_dir: Path) -> dict[str, dict[str, FieldInfo]]:
    """``{"training": {name: FieldInfo}, "lora": {...}}`` for the installed versions."""
    global _memo
    if _memo is not None:
        return _memo
    versions = _versions()
    key = "-".join(f"{k}{v}" for k, v in sorted(versions.items()))
    path = cache_dir / "fields" / f"{key}.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        _memo = {
            section: {name: FieldInfo(**{**info, "types": tuple(info["types"]), "choices": tuple(info["choices"])})
                      for name, info in fields.items()}
            for section, fields in raw.items()
        }
        return _memo
    except (OSError, ValueError, TypeError, KeyError):
        pass  # missing or corrupt: rebuild it
    _memo = _compute()
    serialisable = {s: {n: dataclasses.asdict(i) for n, i in f.items()} for s, f in _memo.items()}
    try:
        atomic_write_text(path, json.dumps(serialisable, indent=1))
    except OSError:
        pass  # a read-only cache only costs speed
    return _memo


def check_value(info: FieldInfo, value: Any) -> str | None:
    """A message when ``value`` cannot be right for the field, else None."""
    if "any" in info.types:
        return None
    kind = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict",
            type(None): "none"}.get(type(value), "any")
    accepted = set(info.types)
    if "float" in accepted:
        accepted.add("int")  # 30 is a fine num_train_epochs
    if kind not in accepted:
        wanted = " or ".join(t if t != "none" else "null" for t in info.types)
        return f"expected {wanted}, got {kind if kind != 'none' else 'null'} {value!r}"
    if kind == "str" and info.choices and value not in info.choices:
        from .errors import did_you_mean

        return did_you_mean(value, info.choices, f"value for {info.name}:").replace("unknown value", "invalid value")
    return None
