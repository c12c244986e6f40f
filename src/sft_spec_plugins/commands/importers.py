"""``sft-spec import trl CONFIG.yaml`` and ``sft-spec import axolotl CONFIG.yml``: an existing recipe as a
spec. Every key of the config is carried over (SFTConfig and LoraConfig fields as they are), or named in a
comment that says why it has no counterpart; the spec gets a starter check (the loss falls, and, when its
data is a local file, the first training answer is learnt), and it is validated as it is written.

TRL's config is the one ``trl sft --config recipe.yaml`` reads (ModelConfig, ScriptArguments and SFTConfig
fields in one mapping; ``datasets:`` mixtures); axolotl's is its YAML (``base_model``, ``adapter``,
``lora_*``, ``datasets`` of ``type: chat_template`` or ``alpaca``, ``sequence_len``, ``micro_batch_size``...).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from sft_spec import hookimpl
from sft_spec.config import default_cache_dir
from sft_spec.errors import UsageError
from sft_spec.loading import is_spec_file, spec_stem

from ..common.escape import safe
from ..common.files import output_path

#: TRL's ModelConfig and ScriptArguments fields, and what becomes of them.
TRL_MODEL_KEYS = {"model_name_or_path", "model_revision", "dtype", "torch_dtype", "trust_remote_code", "use_peft",
                  "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
                  "use_rslora", "use_dora", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
                  "use_bnb_nested_quant", "bnb_4bit_quant_storage", "dataset_name", "dataset_config",
                  "dataset_train_split", "datasets", "lora_target_parameters"}
NO_COUNTERPART = {
    "attn_implementation": "sft-spec loads the model's default attention",
    "dataset_test_split": "a spec has no evaluation dataset: its checks run after training",
    "dataset_streaming": "sft-spec reads data at collection, not streamed",
    "gradient_checkpointing_use_reentrant": "not a spec setting",
    "ignore_bias_buffers": "not a spec setting",
    "model_init_kwargs": "sft-spec loads the model itself (model: and quantization:)",
    "lora_task_type": "sft-spec trains causal language models (peft's CAUSAL_LM)",
}
#: Keys of one dataset entry sft-spec reads; any other is named in a comment.
DATASET_ENTRY_KEYS = {"path", "name", "split", "data_files", "ds_type", "type", "field_messages",
                      "message_property_mappings", "message_field_role", "message_field_content", "roles",
                      "roles_to_train"}
#: Names axolotl's chat_template datasets give the assistant (its default roles_to_train).
ASSISTANT_ROLES = {"assistant", "gpt", "model"}
DATASET_ENTRY_WHY = {
    "train_on_eos": "sft-spec trains each assistant turn's end-of-turn and EOS (format.add_eos)",
    "drop_system_message": "a spec keeps every turn of its data; remove system turns from the file",
    "field_system": "system prompts are turns of the conversation in sft-spec's layouts",
    "data_dir": "give the files themselves as data_files (inside the spec's folder)",
    "revision": "the cached revision is the one read",
}
_DTYPES = {"float32", "bfloat16", "float16", "auto"}


#: Keys that hold credentials (in snake case: ``hubToken`` and ``hub-token`` read as ``hub_token``): never
#: written into a spec, not even as a comment (named as dropped).
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|credentials?|authorization|cookie|bearer)$|"
                         r"(^|_)(api|access|secret|private|auth|client|hub|hf|wandb|comet|neptune|mlflow|github|"
                         r"openai)_?(token|key|secret)$|^use_auth_token$")
#: Credentials inside any value, whatever its key is called: Hugging Face, OpenAI, GitHub and Slack tokens,
#: a bearer token, a password in a URL (``https://user:secret@host``).
_SECRET_VALUE = re.compile(r"hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|"
                           r"github_pat_[A-Za-z0-9_]{20,}|xox[abpr]-[A-Za-z0-9-]{10,}|(?i:bearer)\s+\S{8,}|"
                           r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@")
#: Tokens of a model's vocabulary are not credentials.
_VOCABULARY_TOKEN = re.compile(r"^(eos|bos|pad|unk|sep|cls|mask|chat|special|additional_special)_tokens?$")


def one_line(text: str) -> str:
    """Text for a YAML comment: every control character and line break escaped (escape.safe), so a config's
    key cannot end the comment and inject keys (``"a\\nxfail: x"``) nor make the file unreadable."""
    return safe(text)


def _snake(key: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).replace("-", "_").lower()


def is_secret(key: Any, value: Any) -> bool:
    if isinstance(key, str) and _SECRET_KEY.search(_snake(key)) and not _VOCABULARY_TOKEN.match(_snake(key)):
        return True
    return isinstance(value, str) and bool(_SECRET_VALUE.search(value))


def without_secrets(value: Any, where: str = "") -> tuple[Any, list[str]]:
    """The config with every credential taken out, at any depth, and the dotted names of what was taken."""
    taken: list[str] = []
    if isinstance(value, dict):
        kept = {}
        for key, sub in value.items():
            name = f"{where}.{key}" if where else str(key)
            if is_secret(key, sub):
                taken.append(name)
                continue
            kept[key], inner = without_secrets(sub, name)
            taken += inner
        return kept, taken
    if isinstance(value, list):
        kept_items = []
        for i, sub in enumerate(value):
            if is_secret(None, sub):
                taken.append(f"{where}[{i}]")
                continue
            item, inner = without_secrets(sub, f"{where}[{i}]")
            kept_items.append(item)
            taken += inner
        return kept_items, taken
    return value, taken


class Draft:
    """A spec under construction: its sections, and comments for what was not carried over."""

    def __init__(self, source: Path):
        self.source = source
        self.spec: dict[str, Any] = {}
        self.dropped: list[str] = []
        self.notes: list[str] = []

    def blank(self, config: dict) -> dict:
        """The config without its blank keys (YAML's ``key:`` with no value: the tool's default) and its
        quantization flags set to false (the default), each named."""
        kept = {}
        for key, value in config.items():
            if value is None:
                self.drop(key, value, "left blank: the default is used")
            elif key in ("load_in_4bit", "load_in_8bit") and value is False:
                self.drop(key, value, "false is the default: the base is not loaded quantized by it")
            else:
                kept[key] = value
        return kept

    def drop(self, key: str, value: Any, why: str) -> None:
        self.dropped.append(f"{key}: {json.dumps(value, ensure_ascii=False, default=str)}  # not carried: {why}")

    def text(self) -> str:
        """The spec as YAML emitted by the YAML library; comments (notes and dropped keys) on one line each."""
        header = [f"# Imported from {one_line(self.source.name)} by `sft-spec import`. Review it: the checks are "
                  "a start.", *(f"# note: {one_line(n)}" for n in self.notes)]
        body = yaml.safe_dump(self.spec, allow_unicode=True, sort_keys=False, width=110)
        tail = ["", "# Keys of the original config without a counterpart here:",
                *(f"# {one_line(d)}" for d in self.dropped)] if self.dropped else []
        return "\n".join(header) + "\n" + body + "\n".join(tail) + ("\n" if tail else "")


def _training_fields(draft: Draft, key: str, value: Any, fields: dict, policy, config: dict) -> bool:
    """An SFTConfig field: carried as it is, or commented when a spec may not set it."""
    from ..train.recipe_fields import RENAMED_TRAINING_KEYS

    # A renamed field is written by its new name (validation would note the rename on every run).
    name = RENAMED_TRAINING_KEYS[key] if RENAMED_TRAINING_KEYS.get(key) in fields else key
    if name not in fields:
        return False
    kind = policy.kind("training", name)
    if kind == "refused":
        draft.drop(key, value, policy.why("training", name))
    elif key == "report_to" and value not in ("none", "tensorboard", ["tensorboard"], [], None):
        draft.drop(key, value, "network loggers need --allow-network-loggers on the sft-spec run; set it back then")
    elif name != key and name in config:  # the old name beside its new one: the new one is the recipe's
        draft.drop(key, value, f"old name of {name}, which the config also sets: {name} kept")
    else:
        draft.spec.setdefault("training", {})[name] = value
    return True


#: The keys of one entry of TRL's ``datasets:`` mixture (DatasetConfig) that sft-spec reads.
TRL_ENTRY_KEYS = {"path", "name", "split", "data_files", "columns"}


def _entry_leftovers(draft: Draft, where: str, entry: dict, known: set[str] = DATASET_ENTRY_KEYS) -> None:
    """Every key of a dataset entry that has no counterpart, named with why."""
    for key, value in entry.items():
        if key not in known:
            draft.drop(f"{where}.{key}", value, DATASET_ENTRY_WHY.get(key, "no counterpart in sft-spec's data: reader"))


def _saved(folder: Path) -> bool:
    return any((folder / meta).exists() for meta in ("state.json", "dataset_dict.json"))


def _data_files_in(draft: Draft, folder: Path, shown: Path, top: Path | None = None,
                   seen: set[Path] | None = None) -> list[str]:
    """A folder of data files as ``load_dataset(folder)`` reads it: each data file, hidden paths (``.x``,
    ``_x``) left out, and a folder saved with ``save_to_disk`` inside it as one entry. A link that leaves the
    folder, or leads back into a folder already listed (a loop), is left out and named."""
    top = top or folder.resolve()
    seen = seen if seen is not None else {top}
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_symlink():
            try:
                target = entry.resolve(strict=True)
            except (OSError, RuntimeError):
                draft.drop(str(shown / entry.name), "link", "a broken link or a link loop")
                continue
            if target != top and top not in target.parents:
                draft.drop(str(shown / entry.name), "link", "a link out of the data folder (a spec reads files "
                           "inside its own folder only)")
                continue
            if entry.is_dir() and target in seen:
                draft.drop(str(shown / entry.name), "link", "a link back to a folder already listed")
                continue
        if entry.is_dir():
            seen.add(entry.resolve())
            found += [str(shown / entry.name)] if _saved(entry) else _data_files_in(draft, entry, shown / entry.name,
                                                                                     top, seen)
        elif entry.suffix in (".jsonl", ".json", ".csv", ".parquet", ".arrow"):
            found.append(str(shown / entry.name))
    return found


def _data_source(draft: Draft, folder: Path, path: str, name: str | None, split: str | None,
                 data_files: Any, extra: dict) -> None:
    """A dataset of the config: a local file (kept if it lies in the spec's folder) or a hub dataset."""
    if isinstance(data_files, dict):  # datasets' {split: files}: the split that trains
        chosen = split if split in data_files else "train" if "train" in data_files else next(iter(data_files), None)
        for other in data_files:
            if other != chosen:
                draft.drop(f"data_files.{other}", data_files[other], "a spec trains on one split; its checks run "
                           "after training")
        data_files = data_files.get(chosen) if chosen is not None else None
    files = [data_files] if isinstance(data_files, str) else list(data_files or [])
    if path in ("json", "csv", "parquet", "arrow") and files:
        for file in files:
            draft.spec.setdefault("data", {}).setdefault("files", []).append({"path": file, **extra})
        if name:
            draft.drop("name", name, f"the {path} builder has no configurations")
        return
    local = (folder / path)
    if local.exists():
        listed = _data_files_in(draft, local, Path(path)) if local.is_dir() and not _saved(local) else [path]
        for file in listed:
            draft.spec.setdefault("data", {}).setdefault("files", []).append({"path": file, **extra})
        for key, value in (("name", name), ("data_files", data_files)):
            if value:
                draft.drop(key, value, "a local path is read as it is: list the files you want in data.files")
        return
    data = draft.spec.setdefault("data", {})
    if files:
        draft.drop("data_files", data_files, "a hub dataset is read whole from the datasets cache (its split "
                   "and configuration only); copy the files you want into the spec's folder and use data.files")
    if "dataset" in data:
        draft.drop("datasets", path, "a spec reads one hub dataset (data.dataset); mix them into a local file")
        return
    data["dataset"] = {"path": path, **({"name": name} if name else {}), "split": split or "train", **extra}
    draft.notes.append(f"data.dataset {path} must be in the local datasets cache: sft-spec never downloads")


def import_trl(config: dict, source: Path) -> Draft:
    from ..train import recipe_policy
    from ..train.recipe_fields import recipe_fields

    fields = recipe_fields(default_cache_dir())
    draft = Draft(source)
    config = draft.blank(config)
    spec = draft.spec
    model: dict[str, Any] = {"id": config.get("model_name_or_path", "builtin:tiny-gemma")}
    if config.get("model_revision") not in (None, "main"):
        model["revision"] = config["model_revision"]
    dtype_key = "dtype" if "dtype" in config else "torch_dtype"
    dtype = config.get(dtype_key)
    if dtype in _DTYPES:
        model["dtype"] = dtype
    elif dtype is not None:
        draft.drop(dtype_key, dtype, f"not a dtype sft-spec loads ({', '.join(sorted(_DTYPES))})")
    if config.get("trust_remote_code"):
        model["trust_remote_code"] = True
        draft.notes.append("model.trust_remote_code needs --allow-remote-code on the sft-spec run")
    spec["model"] = model["id"] if list(model) == ["id"] else model
    quantized = config.get("load_in_4bit") or config.get("load_in_8bit")
    if quantized and not config.get("use_peft"):
        for key in ("load_in_4bit", "load_in_8bit"):
            if config.get(key):
                draft.drop(key, config[key], "a quantized base trains through an adapter only: set use_peft for "
                           "QLoRA (trained here as method: full, unquantized)")
        quantized = False
    spec["method"] = ("qlora" if quantized else "lora") if config.get("use_peft") else "full"
    if config.get("use_peft"):
        lora = {k: v for k, v in (("r", config.get("lora_r")), ("lora_alpha", config.get("lora_alpha")),
                                  ("lora_dropout", config.get("lora_dropout")),
                                  ("target_modules", config.get("lora_target_modules")),
                                  ("modules_to_save", config.get("lora_modules_to_save")),
                                  ("use_rslora", config.get("use_rslora")), ("use_dora", config.get("use_dora")),
                                  ("target_parameters", config.get("lora_target_parameters")))
                if v is not None}
        spec["lora"] = lora
    else:
        for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
                    "use_rslora", "use_dora", "lora_target_parameters"):
            if key in config:
                draft.drop(key, config[key], "use_peft is not set: no adapter is trained")
    if quantized:
        quantization = {"load_in_4bit": True} if config.get("load_in_4bit") else {"load_in_8bit": True}
        if config.get("bnb_4bit_quant_type"):
            quantization["bnb_4bit_quant_type"] = config["bnb_4bit_quant_type"]
        if config.get("use_bnb_nested_quant"):
            quantization["bnb_4bit_use_double_quant"] = True
        if config.get("bnb_4bit_quant_storage"):
            quantization["bnb_4bit_quant_storage"] = config["bnb_4bit_quant_storage"]
        spec["quantization"] = quantization
    else:
        for key in ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage"):
            if key in config:
                draft.drop(key, config[key], "no 4-bit loading in this recipe")
    folder = source.parent
    if config.get("dataset_name") and config.get("datasets"):
        draft.drop("dataset_name", config["dataset_name"], "TRL reads datasets when both are given and ignores "
                   "dataset_name (with a warning)")
    elif config.get("dataset_name"):
        _data_source(draft, folder, config["dataset_name"], config.get("dataset_config"),
                     config.get("dataset_train_split"), None, {})
    for i, entry in enumerate(config.get("datasets") or []):  # TRL's dataset mixtures
        if not isinstance(entry, dict) or "path" not in entry:
            draft.drop("datasets", entry, "a mixture entry needs a path")
            continue
        extra: dict[str, Any] = {}
        if entry.get("columns"):
            draft.notes.append(f"datasets[{entry['path']}].columns {entry['columns']}: sft-spec reads the layout's "
                               "own keys")
        _entry_leftovers(draft, f"datasets[{i}]", entry, TRL_ENTRY_KEYS)
        _data_source(draft, folder, entry["path"], entry.get("name"), entry.get("split"), entry.get("data_files"),
                     extra)
    for key, value in config.items():
        if key in TRL_MODEL_KEYS:
            continue
        if key in NO_COUNTERPART:
            draft.drop(key, value, NO_COUNTERPART[key])
        elif not _training_fields(draft, key, value, fields["training"], recipe_policy, config):
            draft.drop(key, value, "not an SFTConfig, ModelConfig or ScriptArguments field sft-spec knows")
    return draft


#: axolotl's optimizer names that differ from transformers'.
AXOLOTL_OPTIMIZERS = {"adamw_bnb_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}
AXOLOTL_TRAINING = {"sequence_len": "max_length", "micro_batch_size": "per_device_train_batch_size",
                    "num_epochs": "num_train_epochs", "lr_scheduler": "lr_scheduler_type"}
AXOLOTL_NOT_CARRIED = {
    "sample_packing": "sft-spec masks one conversation per example; packing would merge them",
    "pad_to_sequence_len": "sft-spec pads per batch",
    "plugins": "axolotl plugins (liger, cut cross entropy, ...) run inside axolotl only",
    "val_set_size": "a spec has no evaluation dataset: its checks run after training",
    "output_dir": "sft-spec writes run files under its own output folder (--output-dir)",
    "dataset_prepared_path": "sft-spec prepares data in its own cache",
    "flash_attention": "sft-spec loads the model's default attention",
    "xformers_attention": "sft-spec loads the model's default attention",
    "sdp_attention": "sft-spec loads the model's default attention",
    "deepspeed": "point training.deepspeed at a config file inside the spec's folder if you need it",
    "fsdp": "set training.fsdp / fsdp_config if you need it", "fsdp_config": "as fsdp",
    "early_stopping_patience": "a spec has no evaluation dataset", "eval_steps": "no evaluation dataset",
    "evals_per_epoch": "no evaluation dataset", "saves_per_epoch": "sft-spec saves no checkpoints",
    "save_steps": "sft-spec saves no checkpoints", "resume_from_checkpoint": "a spec trains from the base model",
    "hub_model_id": "a spec may not publish models or runs", "push_dataset_to_hub": "a spec may not publish",
    "strict": "axolotl's own config check", "lora_fan_in_fan_out": "set lora.fan_in_fan_out if the model needs it",
    "group_by_length": "not a spec setting", "debug": "not a spec setting", "local_rank": "not a spec setting",
    "model_type": "sft-spec loads the model class from its config", "tokenizer_type": "as model_type",
    "special_tokens": "set training.eos_token / pad_token for the tokens that matter to the template",
}

GEMMA = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
         "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
         "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")


def import_axolotl(config: dict, source: Path) -> Draft:
    from ..train import recipe_policy
    from ..train.recipe_fields import recipe_fields

    fields = recipe_fields(default_cache_dir())
    draft = Draft(source)
    config = draft.blank(config)
    spec = draft.spec
    spec["model"] = config.get("base_model", "builtin:tiny-gemma")
    adapter = config.get("adapter")
    quantized = "load_in_8bit" if config.get("load_in_8bit") else "load_in_4bit" if (
        config.get("load_in_4bit") or adapter == "qlora") else None
    spec["method"] = {"lora": "lora", "qlora": "qlora"}.get(adapter, "full")
    if adapter == "lora" and quantized:  # axolotl's LoRA on an 8- or 4-bit base: sft-spec's qlora method
        spec["method"] = "qlora"
        draft.notes.append(f"adapter: lora with {quantized}: LoRA on a quantized base, which is method: qlora here")
    if adapter in ("lora", "qlora"):
        targets = config.get("lora_target_modules")
        if config.get("lora_target_linear"):
            if targets:
                draft.drop("lora_target_modules", targets, "lora_target_linear: true targets every linear layer")
            targets = "all-linear"
        spec["lora"] = {k: v for k, v in (("r", config.get("lora_r")), ("lora_alpha", config.get("lora_alpha")),
                                          ("lora_dropout", config.get("lora_dropout")), ("target_modules", targets),
                                          ("modules_to_save", config.get("lora_modules_to_save")))
                        if v is not None}
    elif adapter:
        draft.drop("adapter", adapter, "sft-spec trains full, lora or qlora")
    if adapter not in ("lora", "qlora"):
        for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear",
                    "lora_modules_to_save"):
            if key in config:
                draft.drop(key, config[key], "no adapter: is set: no adapter is trained")
    if quantized and spec["method"] == "qlora":
        spec["quantization"] = ({"load_in_8bit": True} if quantized == "load_in_8bit" else
                                {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})
    elif quantized:
        draft.drop(quantized, True, "a quantized base trains through an adapter only (adapter: lora or qlora); "
                   "trained here as method: full, unquantized")
    template = config.get("chat_template")
    if template in ("chatml", "gemma"):
        spec.setdefault("format", {})["template"] = CHATML if template == "chatml" else GEMMA
    elif template == "jinja" and config.get("chat_template_jinja"):
        spec.setdefault("format", {})["template"] = config["chat_template_jinja"]
    elif template not in (None, "tokenizer_default"):
        draft.drop("chat_template", template, "give its Jinja text as format.template")
    folder = source.parent
    for i, entry in enumerate(config.get("datasets") or []):
        if not isinstance(entry, dict) or "path" not in entry:
            draft.drop("datasets", entry, "an entry needs a path")
            continue
        _entry_leftovers(draft, f"datasets[{i}]", entry)
        kind = entry.get("type", "chat_template")
        extra: dict[str, Any] = {}
        if entry.get("ds_type") in ("json", "csv", "parquet", "arrow"):
            extra["format"] = entry["ds_type"]
        if kind == "chat_template":
            extra["layout"] = "messages"
            # axolotl trains every assistant turn (roles_to_train, default the assistant's): assistant_only;
            # with the users' turns too, every turn: full. train_on_inputs: true (below) trains all as well.
            trained = entry.get("roles_to_train") or ["assistant"]
            if not isinstance(trained, list) or not set(trained) & ASSISTANT_ROLES:
                draft.drop(f"datasets[{i}].roles_to_train", trained, "no sft-spec collator trains these turns "
                           "alone (assistant_only: the assistant's; full: every turn)")
            elif set(trained) <= ASSISTANT_ROLES:
                spec.setdefault("format", {}).setdefault("collator", "assistant_only")
            else:
                spec.setdefault("format", {})["collator"] = "full"
                draft.notes.append(f"datasets[{i}].roles_to_train {trained}: every turn trains, format.collator: "
                                   "full (system turns too, which axolotl leaves untrained)")
            if entry.get("field_messages") not in (None, "messages"):
                extra["conversation_key"] = entry["field_messages"]
            mapping = entry.get("message_property_mappings") or {}
            role = mapping.get("role", entry.get("message_field_role"))
            content = mapping.get("content", entry.get("message_field_content"))
            if role not in (None, "role"):
                extra["role_key"] = role
            if content not in (None, "content"):
                extra["content_key"] = content
            roles = entry.get("roles") or {}
            if not isinstance(roles, dict) or not all(isinstance(a, list | type(None)) for a in roles.values()):
                draft.drop(f"datasets[{i}].roles", roles, "expected a mapping of role: [names in the data]")
                roles = {}
            role_map = {alias: name for name, aliases in roles.items() for alias in (aliases or []) if alias != name}
            if role_map:
                extra["role_map"] = role_map
        elif kind == "alpaca":
            extra.update(layout="prompt_completion", prompt_key="instruction", completion_key="output")
            draft.notes.append(f"{entry['path']}: alpaca rows train instruction -> output; their input field is not "
                               "carried (fold it into instruction if your rows use it)")
        else:
            draft.drop("datasets", entry, f"type {kind!r}: sft-spec reads chat_template and alpaca datasets")
            continue
        _data_source(draft, folder, entry["path"], entry.get("name"), entry.get("split"),
                     entry.get("data_files"), extra)
    if config.get("train_on_inputs"):  # the prompts carry the loss too: every token trains
        spec.setdefault("format", {})["collator"] = "full"
        draft.notes.append("train_on_inputs: true: the prompts train too, format.collator: full")
    for key, value in config.items():
        if key in ("base_model", "adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                   "lora_target_linear", "lora_modules_to_save", "datasets", "chat_template", "chat_template_jinja",
                   "load_in_4bit", "load_in_8bit", "train_on_inputs"):
            continue
        if key in AXOLOTL_NOT_CARRIED:
            draft.drop(key, value, AXOLOTL_NOT_CARRIED[key])
            continue
        if key.startswith("wandb_") or key.startswith("mlflow_"):
            draft.drop(key, value, "network loggers need --allow-network-loggers (training.report_to)")
            continue
        name = AXOLOTL_TRAINING.get(key, key)
        if key == "optimizer":
            name, value = "optim", AXOLOTL_OPTIMIZERS.get(value, value)
        if key in ("bf16", "fp16", "tf32") and value == "auto":
            draft.notes.append(f"{key}: auto read as true (a machine without it falls back, with a note)")
            value = True
        if not _training_fields(draft, name, value, fields["training"], recipe_policy, config):
            draft.drop(key, value, "no counterpart in sft-spec")
    return draft


def _starter_checks(draft: Draft, folder: Path) -> None:
    """The loss must fall; with local data, the first training answer must be learnt (and not known before)."""
    draft.spec["checks"] = {"loss_decreased": True}
    files = (draft.spec.get("data") or {}).get("files") or []
    if not files:
        return
    from ..collect.data import DataFile, conversations_from_rows, read_source_rows

    class _Item:  # what the data reader needs of an item
        def __init__(self, root: Path):
            self.folder = root.resolve()

    try:
        source = DataFile.model_validate(files[0])
        first = conversations_from_rows(read_source_rows(_Item(folder), source)[:1], source, source.path)[0]
    except Exception as exc:  # noqa: BLE001 - no starter expectation then, and the validation below says why
        draft.notes.append(f"no starter expectation: the first data file could not be read ({exc})")
        return
    if getattr(first, "plain_text", None) is not None:
        return
    prompt = [t for t in first[:-1]]
    answer = first[-1]["content"]
    draft.spec["expect"] = [{"prompt": prompt[-1]["content"] if len(prompt) == 1 else prompt, "equals": answer,
                             "before": {"not_equals": answer}}]


def _rebase_paths(draft: Draft, config_folder: Path, spec_folder: Path) -> None:
    """Data paths of the config are relative to its folder; the spec's to the spec's (``-o`` elsewhere)."""
    import os

    if config_folder.resolve() == spec_folder.resolve():
        return
    for entry in (draft.spec.get("data") or {}).get("files") or []:
        moved = Path(os.path.relpath((config_folder / entry["path"]).resolve(), spec_folder.resolve())).as_posix()
        if moved.startswith("../"):
            draft.notes.append(f"data file {entry['path']} lies outside the spec's folder {spec_folder}: copy it in "
                               "(a spec reads files inside its own folder only)")
        entry["path"] = moved


def _arguments(parser) -> None:
    parser.add_argument("kind", choices=("trl", "axolotl"), help="the config's tool")
    parser.add_argument("config", type=Path, metavar="CONFIG.yaml", help="the recipe's config file")
    parser.add_argument("-o", "--output", type=output_path, metavar="SPEC.sft.yaml",
                        help="where to write the spec (default: beside the config, CONFIG.sft.yaml)")
    parser.add_argument("--model", help="the model to use instead of the config's (e.g. builtin:tiny-gemma, for "
                        "a quick run of the recipe on a tiny model)")
    parser.add_argument("--force", action="store_true", help="overwrite the output file")


def _run(options, pluginmanager) -> int:
    from sft_spec.cli import main
    from sft_spec.errors import SpecError
    from sft_spec.loading import load_yaml_file

    from ..common.files import atomic_write_text

    try:  # the spec loader's YAML: safe, bounded in size, depth and expansion (an alias bomb is refused)
        config = load_yaml_file(options.config).data
    except SpecError as exc:
        raise UsageError(f"cannot read the config: {exc}") from None
    except OSError as exc:
        raise UsageError(f"{options.config}: cannot read the config: {exc}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{options.config}: expected a mapping of settings")
    config, secrets = without_secrets(config)
    draft = (import_trl if options.kind == "trl" else import_axolotl)(config, options.config)
    draft.dropped += [f"{name}  # not carried: a credential; never written into a spec (give it to the run "
                      "through the environment)" for name in secrets]
    if options.model:
        draft.notes.append(f"model: {json.dumps(draft.spec.get('model'), ensure_ascii=False)} replaced by --model")
        draft.spec["model"] = options.model
    draft.spec.pop("checks", None)
    _starter_checks(draft, options.config.parent)
    output = options.output or options.config.with_name(options.config.name.lstrip(".").split(".")[0] + ".sft.yaml")
    if output.is_dir():
        raise UsageError(f"-o {output} is a folder: give the spec file's path (e.g. {output / 'recipe.sft.yaml'})")
    if not spec_stem(output).lstrip(".") or output.name.startswith(".") or not is_spec_file(output):
        raise UsageError(f"{output}: a spec file is named NAME.sft.yaml, not hidden (sft-spec run collects those "
                         "only); give one with -o")
    if output.exists() and not options.force:
        raise UsageError(f"{output} exists; pass --force to overwrite")
    _rebase_paths(draft, options.config.parent, output.parent)
    if draft.spec.get("data") is None:
        draft.notes.append("no dataset was found in the config: add data: (conversations, files or a cached dataset)")
    atomic_write_text(output, draft.text())
    print(f"wrote {output} ({len(draft.dropped)} keys not carried over, listed at its end)")
    if any(part.startswith(".") and part not in (".", "..") for part in output.parent.parts):
        print(f"note: {output.parent} is a hidden folder: `sft-spec run .` does not collect it; run the spec by "
              f"its path (sft-spec run {output})")
    return int(main(["validate", str(output)]))


@hookimpl
def sft_spec_register_commands(register):
    register("import", "turn a TRL (trl sft --config) or axolotl config into a spec", _arguments, _run)
