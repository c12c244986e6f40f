"""``sft-spec plugins`` (what is installed), ``sft-spec schema`` (a JSON Schema of the spec format, for
editors) and ``sft-spec init`` (a first spec).

The schema comes from the pydantic models in ``sft_spec.spec``, completed with what only the running
installation knows: the checks plugins registered (keys of ``expect`` entries and ``checks``) and the
fields of the installed ``trl.SFTConfig``, ``peft.LoraConfig`` and ``BitsAndBytesConfig``, so an
editor with a YAML language server completes ``training:`` keys. Point the editor at it with a first
line ``# yaml-language-server: $schema=sft-spec.schema.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from sft_spec import hookimpl
from sft_spec.config import default_cache_dir
from sft_spec.errors import UsageError

from ..common.files import OutsideWrite, atomic_write_text, check_written, output_path

_JSON_TYPES = {"bool": "boolean", "int": "integer", "float": "number", "str": "string", "list": "array",
               "dict": "object", "none": "null"}


def _field_schema(info) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "any" not in info.types:
        types = sorted({_JSON_TYPES[t] for t in info.types if t in _JSON_TYPES})
        if "integer" in types and "number" in types:
            types.remove("integer")
        out["type"] = types[0] if len(types) == 1 else types
    if info.choices:
        out["enum"] = list(info.choices) + ([None] if "none" in info.types else [])
    if info.help:
        out["description"] = info.help.replace("%%", "%")  # argparse's escape in transformers' help texts
    if info.default is not None:
        out["default"] = info.default
    return out


def spec_schema(pluginmanager, cache_dir: Path) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a ``*.sft.yaml`` file for this installation."""
    from sft_spec.pluginmanager import build_registry
    from sft_spec.spec import Spec

    from ..train.recipe_fields import RENAMED_TRAINING_KEYS, recipe_fields

    schema = Spec.model_json_schema()
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              "title": "sft-spec spec file (*.sft.yaml)", **{k: v for k, v in schema.items() if k != "title"}}
    props = schema["properties"]
    defs = schema.get("$defs", {})
    # Shorthands the loader accepts besides the mapping form.
    if "model" in props and "ModelSpec" in defs:
        props["model"] = {"anyOf": [{"type": "string", "description": "model id"}, {"$ref": "#/$defs/ModelSpec"}],
                          "description": props["model"].get("description", "")}
    if "xfail" in props:
        props["xfail"]["anyOf"] = [{"type": "string"}, {"type": "boolean"}, *props["xfail"].get("anyOf", [])]
    if "tags" in props:
        props["tags"] = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                         "description": props["tags"].get("description", "")}
    if "skip" in props:
        props["skip"]["anyOf"] = [*props["skip"].get("anyOf", [{"type": "string"}]), {"type": "boolean"}]

    registry = build_registry(pluginmanager)
    for name, section in registry.sections.items():  # plugins' own top-level keys
        sub = section.model.model_json_schema()
        defs.update(sub.pop("$defs", {}))
        props[name] = {**sub, "description": section.description or sub.get("description", "")}
    answer = {n: {"description": c.description} for n, c in registry.checks.items() if c.scope == "answer"}
    training = {n: {"description": c.description} for n, c in registry.checks.items() if c.scope == "training"}
    message = {"$ref": "#/$defs/Message"} if "Message" in defs else {"type": "object"}
    if "expect" in props:
        props["expect"]["items"] = {
            "type": "object", "required": ["prompt"], "additionalProperties": False,
            "properties": {
                "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": message}],
                           "description": "one user turn, or a chat as a list of {role, content}"},
                "before": {"type": "object", "properties": answer, "additionalProperties": False,
                           "description": "checks on the base model's answer, before training"},
                "xfail": {"anyOf": [{"type": "string"}, {"type": "boolean"},
                                    {"$ref": "#/$defs/XfailSpec"} if "XfailSpec" in defs else {"type": "object"}],
                          "description": "this expectation is expected to fail: a reason, true, or {reason, strict}"},
                **answer,
            },
        }
    if "checks" in props:
        props["checks"].update(properties=training, additionalProperties=False)

    fields = recipe_fields(cache_dir)
    for section in ("training", "lora", "quantization"):
        if section in props and section in fields:
            props[section]["properties"] = {name: _field_schema(info) for name, info in sorted(fields[section].items())}
            # As validation: a field SFTConfig (LoraConfig, BitsAndBytesConfig) does not have is a typo.
            props[section]["additionalProperties"] = False
    if "training" in props:
        for old, new in RENAMED_TRAINING_KEYS.items():
            props["training"]["properties"].setdefault(
                old, {"deprecated": True, "description": f"old name of {new}; accepted with a note"})
    return schema


def _schema_arguments(parser) -> None:
    parser.add_argument("-o", "--output", type=output_path, metavar="PATH",
                        help="write to a file instead of stdout")
    parser.add_argument("--cache-dir", type=output_path,
                        help="cache folder (default: $SFT_SPEC_CACHE or ~/.cache/sft-spec)")


def _run_schema(options, pluginmanager) -> int:
    schema = spec_schema(pluginmanager, options.cache_dir or default_cache_dir())
    text = json.dumps(schema, indent=2, ensure_ascii=False, default=str) + "\n"
    if options.output:
        atomic_write_text(options.output, text)
        print(f"JSON Schema written to {options.output}")
    else:
        sys.stdout.write(text)
    return 0


# -- init --------------------------------------------------------------------------------------------

FIRST_SPEC = """\
# A first spec: teach a tiny built-in model one answer, then check that it learnt it.
# Run it with `sft-spec run {folder}`; swap the model for your own (a hub id or a folder) when ready.
name: first
description: The model learns to answer "ping" with "pong".
tags: [smoke]

model: builtin:tiny-gemma
method: lora
lora:
  r: 16
  lora_alpha: 32
  target_modules: [q_proj, k_proj, v_proj, o_proj]

training:
  num_train_epochs: 30
  learning_rate: 1.0e-2
  per_device_train_batch_size: 8
  seed: 42

data:
  files:
    - path: data/first.jsonl      # JSON Lines, one conversation per line

expect:
  - prompt: ping
    equals: pong
    before:
      not_equals: pong            # the base model did not know it: the training taught it

checks:
  loss_decreased: true
"""

FIRST_DATA = '{"messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]}\n'

README = """\
# Fine-tuning specs

Each `*.sft.yaml` file here is a recipe and its test: the model, the training conversations, the
training settings, and what the trained model must answer.

```sh
sft-spec run {folder}                  # train, generate, check
sft-spec run {folder} -k expect -v     # the answer checks only, one line per check
sft-spec run {folder} --lf             # only what failed last time
sft-spec validate {folder}             # check the files without training
sft-spec schema -o sft-spec.schema.json  # JSON Schema for editor completion
```

The same files run under pytest: `pytest {folder}`.
"""


def _init_arguments(parser) -> None:
    parser.add_argument("folder", nargs="?", type=output_path, default="specs", metavar="DIR",
                        help="where to write the spec, its data and a README (default: specs)")
    parser.add_argument("--force", action="store_true", help="overwrite files that exist")


def _run_init(options, pluginmanager) -> int:
    folder: Path = options.folder
    shown = folder.as_posix().rstrip("/") + "/"
    files = {
        folder / "first.sft.yaml": FIRST_SPEC.format(folder=shown),
        folder / "data" / "first.jsonl": FIRST_DATA,
        folder / "README.md": README.format(folder=shown),
    }
    existing = [p for p in files if p.exists()]
    if existing and not options.force:
        raise UsageError(f"{existing[0]} exists; pass --force to overwrite")
    for path, text in files.items():
        try:  # a committed link (data/ -> elsewhere) inside the folder is not written through
            atomic_write_text(check_written(path, folder), text)
        except OutsideWrite as exc:
            raise UsageError(str(exc)) from None
        print(f"wrote {path}")
    print(f"next: sft-spec run {shown} -v")
    return 0


# -- plugins -----------------------------------------------------------------------------------------


def _run_plugins(options, pluginmanager) -> int:
    """Every plugin with its version, its hooks and what it registered; broken ones last (exit 3)."""
    from importlib import metadata

    from sft_spec.pluginmanager import ENTRY_POINT_GROUP, build_registry

    registry = build_registry(pluginmanager)
    versions = {ep.name: dist.version for dist in metadata.distributions() for ep in dist.entry_points
                if ep.group == ENTRY_POINT_GROUP}
    for name, plugin in pluginmanager.list_name_plugin():
        if plugin is None:  # a blocked name
            continue
        module = getattr(plugin, "__name__", type(plugin).__module__)
        version = versions.get(name) or (metadata.version("sft-spec") if module.startswith("sft_spec") else "")
        print(f"{name} {version}".rstrip() + f"  ({module})")
        print("    hooks: " + (", ".join(sorted(c.name for c in pluginmanager.get_hookcallers(plugin) or [])) or "-"))
        for kind, table in (("formatters", registry.formatters), ("collators", registry.collators),
                            ("model loaders", registry.model_loaders), ("checks", registry.checks),
                            ("spec sections", registry.sections)):
            names = [n for n, v in table.items() if v.plugin == name]
            if names:
                print(f"    {kind}: {', '.join(names)}")
    for shadowed in registry.shadowed:
        print(f"note: {shadowed}")
    for problem in pluginmanager.problems:
        print(f"BROKEN {problem.name}: {problem.message}")
    return 3 if pluginmanager.problems else 0


@hookimpl
def sft_spec_register_commands(register):
    register("plugins", "list installed plugins, their versions, hooks and what they registered",
             lambda parser: None, _run_plugins)
    register("schema", "print the JSON Schema of spec files (for editor completion and validation)",
             _schema_arguments, _run_schema)
    register("init", "write a first spec, its data file and a README into a folder", _init_arguments, _run_init)
