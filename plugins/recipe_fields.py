"""``training:``, ``lora:`` and ``quantization:`` checked against the installed TRL, peft and transformers.

Importing trl and peft takes seconds; validation must stay instant. The field lists of ``SFTConfig``,
``LoraConfig`` and ``BitsAndBytesConfig`` are computed once per installed version and cached as JSON in
the cache folder. Every problem is an error located at its own key, with a did-you-mean hint.
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

from sft_spec import hookimpl
from sft_spec.errors import SpecError, did_you_mean

from .files import atomic_write_text

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
        return did_you_mean(value, info.choices, f"value for {info.name}:").replace("unknown value", "invalid value")
    return None


# -- the validation hook -------------------------------------------------------------------------------


def _rename_old_keys(item, known: dict[str, FieldInfo]) -> list[SpecError]:
    """``max_seq_length`` and other old names, read as today's where the installed TRL has them."""
    training, errors = item.spec.training, []
    for old, new in RENAMED_TRAINING_KEYS.items():
        if old not in training or new not in known:
            continue
        where = item.locate("training", old)
        if new in training:
            errors.append(SpecError(f"both {old!r} and its new name {new!r} are set; keep {new!r}", where,
                                    key=f"training.{old}"))
            continue
        training[new] = training.pop(old)  # the item's own copy of the spec
        item.doc.locations[("training", new)] = where
        item.notes.append(f"{where}: note: training.{old} is now {new} in TRL/transformers; read as {new}")
    return errors


def _check_section(item, section: str, values: dict, known: dict, managed: dict, what: str) -> list[SpecError]:
    errors = []
    for key, value in values.items():
        where = item.locate(section, key)
        if key in managed:
            errors.append(SpecError(f"{key!r} cannot be set in a spec: {managed[key]}", where, key=f"{section}.{key}"))
        elif key not in known:
            errors.append(SpecError(did_you_mean(str(key), list(known), f"{what} field"), where,
                                    key=f"{section}.{key}"))
        else:
            problem = check_value(known[key], value)
            if problem:
                errors.append(SpecError(problem, where, key=f"{section}.{key}"))
    return errors


@hookimpl
def sft_spec_validate_spec(item, config) -> list[SpecError]:
    spec = item.spec
    if not spec.training and not spec.lora and not spec.quantization:
        return []
    fields = recipe_fields(config.cache_dir)
    errors = _rename_old_keys(item, fields["training"]) if spec.training else []
    errors += _check_section(item, "training", spec.training, fields["training"], MANAGED_TRAINING_KEYS,
                             "trl.SFTConfig")
    errors += _check_section(item, "lora", spec.lora, fields["lora"], MANAGED_LORA_KEYS, "peft.LoraConfig")
    if spec.quantization and "quantization" in fields:
        errors += _check_section(item, "quantization", spec.quantization, fields["quantization"], {},
                                 "transformers.BitsAndBytesConfig")
    return errors
