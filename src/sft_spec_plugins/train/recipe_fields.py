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
import math
import re
import types as types_module
import typing
from importlib import metadata
from pathlib import Path
from typing import Any

from sft_spec import hookimpl
from sft_spec.errors import SpecError, did_you_mean
from sft_spec.loading.paths import check_inside

from ..common.files import atomic_write_text
from . import recipe_policy

#: Old names users bring from older TRL scripts, mapped to today's names.
#: A key is renamed only where the installed TRL has the new name.
RENAMED_TRAINING_KEYS = {
    "max_seq_length": "max_length",
    "evaluation_strategy": "eval_strategy",
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}

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
            training.pop(old)  # one mistake, one error: not also "unknown field"
            continue
        training[new] = training.pop(old)  # the item's own copy of the spec
        item.doc.locations[("training", new)] = where
        item.notes.append(f"{where}: note: training.{old} is now {new} in TRL/transformers; read as {new}")
    return errors


#: Values TRL would accept here and reject (or misuse) at training time: (least, greatest, why); a bound in
#: a tuple ``(x,)`` is exclusive. Found by trying each numeric field's edges against TRL, peft and torch.
BOUNDS: dict[tuple[str, str], tuple[Any, Any, str]] = {
    ("training", "per_device_train_batch_size"): (1, None, "a batch holds at least one example"),
    ("training", "gradient_accumulation_steps"): (1, None, "at least one step per optimizer update"),
    ("training", "learning_rate"): (0, None, "a learning rate is a number >= 0"),
    ("training", "num_train_epochs"): ((0,), None, "train for more than 0 epochs"),
    ("training", "warmup_steps"): (0, None, "warmup steps are >= 0"),
    ("training", "weight_decay"): (0, None, "weight decay is >= 0"),
    ("training", "logging_steps"): ((0,), None, "log every n > 0 steps"),
    ("training", "max_length"): (2, None, "a training text needs at least a prompt token and an answer token"),
    ("training", "adam_beta1"): (0, (1,), "Adam's beta1 is in [0, 1)"),
    ("training", "adam_beta2"): (0, (1,), "Adam's beta2 is in [0, 1)"),
    ("training", "adam_epsilon"): (0, None, "Adam's epsilon is >= 0"),
    ("training", "seed"): (0, 2**32 - 1, "a seed is from 0 to 2**32 - 1"),
    ("training", "data_seed"): (0, 2**32 - 1, "a seed is from 0 to 2**32 - 1"),
    ("training", "dataloader_num_workers"): (0, None, "a number of worker processes is >= 0"),
    ("training", "pad_to_multiple_of"): (1, None, "padding to a multiple of n needs n >= 1"),
    ("training", "label_smoothing_factor"): (0, 1, "label smoothing is a probability mass, from 0 to 1"),
    ("lora", "r"): (1, None, "a LoRA rank is at least 1"),
    ("lora", "lora_alpha"): ((0,), None, "lora_alpha is > 0"),
    ("lora", "lora_dropout"): (0, (1,), "a dropout probability is in [0, 1)"),
}
#: Optimizers and flags that need a package of their own: refused at their key when it is not installed.
NEEDS_PACKAGE = {"galore": "galore_torch", "apollo": "apollo_torch", "lomo": "lomo_optim",
                 "schedule_free": "schedulefree", "grokadamw": "grokadamw", "4bit": "torchao",
                 "8bit_torchao": "torchao", "use_liger_kernel": "liger_kernel", "stable_adamw": "optimi"}
#: BitsAndBytesConfig values that are a spec's choice, checked here so a typo is never blamed on the machine.
QUANTIZATION_CHOICES = {
    "bnb_4bit_quant_type": ("fp4", "nf4"),
    "bnb_4bit_compute_dtype": ("float32", "bfloat16", "float16"),
    "bnb_4bit_quant_storage": ("uint8", "float32", "bfloat16", "float16"),
}


#: A field whose value may be a file: it takes a string, and its name or its help says so.
_PATH_NAME = re.compile(r"(_path|_dir|_file|_config)$|^deepspeed$")
_PATH_HELP = re.compile(r"\b(path|file|director(y|ies))\b", re.I)




def path_fields(fields: dict[str, FieldInfo]) -> set[str]:
    """The fields of SFTConfig (or LoraConfig) that name files, found from their types, names and help."""
    return {name for name, info in fields.items()
            if "str" in info.types and (_PATH_NAME.search(name) or _PATH_HELP.search(info.help))}


def _bound_problem(section: str, key: str, value: Any) -> str | None:
    bound = BOUNDS.get((section, key))
    if bound is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    least, greatest, why = bound
    too_low = least is not None and (value <= least[0] if isinstance(least, tuple) else value < least)
    too_high = greatest is not None and (value >= greatest[0] if isinstance(greatest, tuple) else value > greatest)
    if math.isnan(value) or math.isinf(value) or too_low or too_high:
        return f"{value!r} cannot train: {why}"
    return None


def _package_problem(key: str, value: Any) -> str | None:
    """An optimizer or flag whose package is missing: the spec asks for it, so it is refused, not emulated."""
    import importlib.util

    wanted = [pkg for name, pkg in NEEDS_PACKAGE.items()
              if (key == "optim" and isinstance(value, str) and name in value) or (key == name and value is True)]
    missing = [pkg for pkg in wanted if importlib.util.find_spec(pkg) is None]
    return f"{key}: {value!r} needs the {missing[0]} package, which is not installed" if missing else None


def _check_section(item, config, section: str, values: dict, known: dict, what: str) -> list[SpecError]:
    errors, paths = [], path_fields(known)
    for key, value in values.items():
        where, dotted = item.locate(section, key), f"{section}.{key}"
        policy, why = recipe_policy.kind(section, key), recipe_policy.why(section, key)
        if key not in known and policy != "refused":
            errors.append(SpecError(did_you_mean(str(key), list(known), f"{what} field"), where, key=dotted))
        elif policy == "refused":
            errors.append(SpecError(f"{key!r} cannot be set in a spec: {why}", where, key=dotted))
        elif problem := (check_value(known[key], value) or _bound_problem(section, key, value)
                         or _package_problem(key, value)):
            errors.append(SpecError(problem, where, key=dotted))
        elif "dict" in known[key].types and isinstance(value, str) and key not in paths:
            # TrainingArguments reads a string here as JSON: in a spec, write the mapping itself.
            errors.append(SpecError(f"expected a mapping, got string {value!r} (write the {key} mapping in the spec)",
                                    where, key=dotted))
        elif key in paths and isinstance(value, str) and (problem := _outside(item, value, dotted)):
            errors.append(SpecError(problem, where, key=dotted))
        elif policy == "managed":
            item.notes.append(f"{where}: note: {dotted} is not used as written: {why}")
    return errors


def _outside(item, value: str, dotted: str) -> str | None:
    try:
        check_inside(item.folder, value, dotted)
    except ValueError as exc:
        return str(exc)
    return None


def _special_training_keys(item, config) -> list[SpecError]:
    """Keys sft-spec honours itself: report_to (local loggers only) and chat_template_path."""
    from .formatters import FORMAT

    training, errors = item.spec.training, []
    fmt = item.section(FORMAT)
    # (completion_only_loss and assistant_only_loss are read by the collators' plugin, as format.collator.)
    if "report_to" in training:
        loggers = training["report_to"]
        loggers = [loggers] if isinstance(loggers, str) else list(loggers or [])
        remote = [name for name in loggers if name not in recipe_policy.LOCAL_LOGGERS]
        if remote and not config.getoption("allow_network_loggers"):
            errors.append(SpecError(f"report_to {', '.join(map(repr, remote))} sends the run to a network service; "
                                    "pass --allow-network-loggers to allow it (tensorboard writes local files)",
                                    item.locate("training", "report_to"), key="training.report_to"))
    template = training.get("chat_template_path")
    if isinstance(template, str):
        where = item.locate("training", "chat_template_path")
        if not template.endswith((".jinja", ".j2")):  # TRL would take anything else for a hub id to load
            errors.append(SpecError(f"training.chat_template_path {template!r}: expected a .jinja or .j2 file "
                                    "inside the spec's folder", where, key="training.chat_template_path"))
        else:
            try:
                found = check_inside(item.folder, template, "training.chat_template_path").is_file()
            except ValueError:
                found = True  # the path rule says why, at the same key
            if not found:
                errors.append(SpecError(f"training.chat_template_path {template!r}: no such file in the spec's "
                                        "folder", where, key="training.chat_template_path"))
        if fmt is not None and fmt.template:
            errors.append(SpecError("both format.template and training.chat_template_path give a chat template: "
                                    "keep one", where, key="training.chat_template_path"))
    return errors


@hookimpl
def sft_spec_resolve_spec(item, config) -> list[SpecError]:
    """Renamed TRL/transformers fields read by their new names (with a note), before any check reads them."""
    if not item.spec.training:
        return []
    return _rename_old_keys(item, recipe_fields(config.cache_dir)["training"])


@hookimpl
def sft_spec_validate_spec(item, config) -> list[SpecError]:
    spec = item.spec
    errors: list[SpecError] = []
    if spec.quantization and spec.method != "qlora":
        errors.append(SpecError(f"quantization applies to method: qlora; with method: {spec.method} it would be "
                                "ignored (set method: qlora, or remove quantization)", item.locate("quantization"),
                                key="quantization"))
    if spec.lora and spec.method == "full":  # a matrix may share lora: between variants, so a note, not an error
        item.notes.append(f"{item.locate('lora')}: note: lora: is not used by method: full (it applies to lora and "
                          "qlora)")
    training = spec.training
    if training.get("dataloader_prefetch_factor") is not None and not training.get("dataloader_num_workers"):
        errors.append(SpecError("dataloader_prefetch_factor needs dataloader_num_workers > 0 (PyTorch refuses it "
                                "otherwise)", item.locate("training", "dataloader_prefetch_factor"),
                                key="training.dataloader_prefetch_factor"))
    if not spec.training and not spec.lora and not spec.quantization:
        return errors
    fields = recipe_fields(config.cache_dir)
    errors += _check_section(item, config, "training", spec.training, fields["training"], "trl.SFTConfig")
    errors += _special_training_keys(item, config)
    errors += _check_section(item, config, "lora", spec.lora, fields["lora"], "peft.LoraConfig")
    init = spec.lora.get("init_lora_weights")
    if isinstance(init, str) and init.lower() in recipe_policy.DATA_DRIVEN_INITS:
        errors.append(SpecError(f"init_lora_weights {init!r} needs an initialisation pass over the training data "
                                "that sft-spec does not run (pissa, olora, gaussian and true work)",
                                item.locate("lora", "init_lora_weights"), key="lora.init_lora_weights"))
    if spec.quantization and "quantization" in fields:
        errors += _check_section(item, config, "quantization", spec.quantization, fields["quantization"],
                                 "transformers.BitsAndBytesConfig")
        for key, choices in QUANTIZATION_CHOICES.items():
            value = spec.quantization.get(key)
            if value is not None and str(value).replace("torch.", "") not in choices:
                errors.append(SpecError(did_you_mean(str(value), choices, f"value for {key}:")
                                        .replace("unknown value", "invalid value"), item.locate("quantization", key),
                                        key=f"quantization.{key}"))
    return errors


@hookimpl
def sft_spec_cache_key(item, config):
    """Files the training settings name (chat_template_path, ...), by contents: the same name in another
    spec's folder, or an edited file, is another recipe."""
    from ..common.files import named_files

    return {"training_files": named_files(item)}
