"""Regenerate docs/spec-reference.md from the code the loader validates with, and refresh the example
files that docs/writing-plugins.md quotes.

    python docs/generate.py           # rewrite the pages that are stale
    python docs/generate.py --check   # exit 1 when a committed page is stale (what tests/core/test_docs.py checks)
    python docs/generate.py --hooks-skeleton   # print docs/hooks.md sections for hooks the page lacks

The reference is built from the pydantic models in ``sft_spec.spec`` (keys, types, defaults, allowed
values, descriptions), the harness settings in ``sft_spec_plugins.train.trainer`` and ``sft_spec.recipe_fields``,
and the registry that sft-spec's own plugins fill (checks, formatters, collators, model loaders). Plugins
from other distributions are left out, so the page is the same on every machine.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from importlib import metadata
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, RootModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

DOCS = Path(__file__).resolve().parent
REFERENCE = DOCS / "spec-reference.md"
HOOKS = DOCS / "hooks.md"
WALKTHROUGH = DOCS / "writing-plugins.md"
REPO = DOCS.parent
#: ``<!-- file: PATH -->`` and the fenced block after it: the block is the file at PATH, verbatim.
QUOTE = re.compile(r"(<!-- file: (\S+) -->\n```\w*\n)(.*?)^(```)$", re.M | re.S)
SCRIPT = "python docs/generate.py"


# -- types and defaults, in the words of a YAML file -------------------------------------------------


def type_name(annotation: Any) -> str:
    """``str | None`` -> ``string or null``; nested models are "mapping" (their keys get their own table)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        if args and args[1] is not Any:
            return f"mapping of {type_name(args[0])} to {type_name(args[1])}"
        return "mapping"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return {str: "string", bool: "boolean", int: "integer", float: "number"}.get(annotation, "any")


def yaml_value(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, str):
        return f"`{value!r}`" if value.strip() != value or not value or "\n" in value else f"`{value}`"
    if value == [] or value == {}:
        return f"`{value}`"
    return f"`{value}`"


def default_of(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return yaml_value(field.default_factory())  # type: ignore[call-arg]
    if field.default is PydanticUndefined:
        return "**required**"
    return yaml_value(field.default)


def constraints(field: FieldInfo) -> str:
    out = []
    for meta in field.metadata:
        for cls, attr, sign in ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="),
                                (annotated_types.Lt, "lt", "<"), (annotated_types.Le, "le", "<=")):
            if isinstance(meta, cls):
                out.append(f"{sign} {getattr(meta, attr)}")
    return ", ".join(out)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def nested_models(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """Every mapping inside the spec with its key path (``data.files[]``), in field order, depth first."""
    out = []
    for name, field in model.model_fields.items():
        annotation, suffix = field.annotation, ""
        while True:
            origin, args = typing.get_origin(annotation), typing.get_args(annotation)
            if origin in (typing.Union, types.UnionType):
                annotation = next((a for a in args if a is not type(None)), type(None))
            elif origin is list and args:
                annotation, suffix = args[0], suffix + "[]"
            else:
                break
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            path = f"{prefix}{name}{suffix}"
            out.append((path, annotation))
            out += nested_models(annotation, f"{path}.")
    return out


def mapping_of(model: type[BaseModel]) -> type[BaseModel] | None:
    """The entry model of a section written as a mapping of names to entries (``eval: {golden: {...}}``)."""
    if not issubclass(model, RootModel):
        return None
    annotation = model.model_fields["root"].annotation
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is dict and len(args) == 2 and isinstance(args[1], type) \
            and issubclass(args[1], BaseModel):
        return args[1]
    return None


def model_table(model: type[BaseModel], prefix: str) -> list[str]:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        kind = type_name(field.annotation)
        limit = constraints(field)
        if limit:
            kind += f" ({limit})"
        lines.append(f"| `{prefix}{name}` | {cell(kind)} | {cell(default_of(field))} | "
                     f"{cell(field.description or '')} |")
    return lines


# -- the registry of sft-spec's own plugins ----------------------------------------------------------


def own_plugin_manager():
    """A plugin manager with only the plugins sft-spec ships, so other installs do not change the page."""
    from sft_spec.pluginmanager import ENTRY_POINT_GROUP, make_plugin_manager

    foreign = {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)
               if ep.dist is not None and ep.dist.name.replace("_", "-").lower() != "sft-spec"}
    return make_plugin_manager(disabled=foreign)


def checks_by_plugin(pm) -> list[tuple[str, Any]]:
    """``(plugin, Check)`` in a fixed order: the ``checks`` plugin first, then the others by name."""
    impls = sorted(pm.hook.sft_spec_register_checks.get_hookimpls(),
                   key=lambda impl: (impl.plugin_name != "checks", impl.plugin_name))
    out: list[tuple[str, Any]] = []
    for impl in impls:
        found: list[Any] = []
        impl.function(register=found.append)
        out.extend((impl.plugin_name, check) for check in found)
    return out


# -- the page ----------------------------------------------------------------------------------------


def render_reference() -> str:
    from sft_spec.loading import DEFAULTS_NAME, SPEC_SUFFIXES
    from sft_spec.loading.expectations import EXPECTATION_KEYS
    from sft_spec.pluginmanager import build_registry
    from sft_spec.spec import Spec
    from sft_spec_plugins.train import recipe_policy
    from sft_spec_plugins.train.collators import RENAMED_COLLATORS
    from sft_spec_plugins.train.recipe_fields import RENAMED_TRAINING_KEYS
    from sft_spec_plugins.train.trainer import FORCED, HARNESS_DEFAULTS

    pm = own_plugin_manager()
    registry = build_registry(pm)
    checks = checks_by_plugin(pm)

    out = [
        "# Spec reference",
        "",
        f"<!-- Generated by `{SCRIPT}` from src/sft_spec/spec.py and src/sft_spec_plugins/ "
        "(TRL fields: src/sft_spec_plugins/train/recipe_fields.py)."
        " Do not edit by hand: edit the code (e.g. a Field's description) and run the script. -->",
        "",
        f"A spec is a YAML file named `*{SPEC_SUFFIXES[0]}` (or `*{SPEC_SUFFIXES[1]}`). Every key below is "
        "validated: an unknown key, a wrong type or a missing value is an error that names "
        "`file:line:column` and suggests the closest key. `sft-spec validate PATH` checks files without "
        "training. For worked examples see [recipes.md](recipes.md); for the format's walkthrough see "
        "[spec-format.md](spec-format.md).",
        "",
        "## Top-level keys",
        "",
        *model_table(Spec, ""),
        "",
        "Shorthands: `model: NAME` is `model: {id: NAME}`; `tags: smoke` is `tags: [smoke]`; "
        "`xfail: REASON` and `xfail: true` set the reason; `skip: true` skips with a default reason.",
        "",
    ]
    notes = {
        "data.files[]": "Each line of a file is one JSON object holding a conversation. Paths are relative to the "
                        "spec file and may not leave the spec directory.",
        "data.conversations[][]": "A turn of a training conversation; a prompt given as a list uses the same keys. "
                                  "A conversation is an optional system turn, then user and assistant turns "
                                  "alternating, ending with an assistant turn.",
        "matrix[]": "Any other key of a matrix entry is deep-merged over the spec (mappings key by key; lists and "
                    "values replace). An entry cannot set `name` or `matrix`.",
    }
    for path, model in nested_models(Spec):
        out += [f"## {path}", ""]
        if path in notes:
            out += [notes[path], ""]
        out += [*model_table(model, f"{path}."), ""]
        if path == "model":
            out += ["Model loaders (the first that claims `model.id` loads it):", "",
                    *named_table(registry.model_loaders), ""]

    for name, section in sorted(registry.sections.items()):
        how = "required" if section.required else "optional, defaults as below" if section.default else "optional"
        shape, prefix = section.model, f"{name}."
        entry = mapping_of(shape)
        if entry is not None:  # a RootModel of {name: entry}: the entry's keys are what a user writes
            shape, prefix = entry, f"{name}.<name>."
        out += [f"## {name}", "", f"{cell(section.description)} (a key of plugin `{section.plugin}`; {how})"
                + (": a mapping of names to entries with these keys" if entry is not None else "") + ".", "",
                *model_table(shape, prefix), ""]
        for path, model in nested_models(shape, prefix):
            about = [notes[path], ""] if path in notes else []
            out += [f"## {path}", "", *about, *model_table(model, f"{path}."), ""]
        if name == "format":
            out += ["Formatters (`format.formatter`):", "", *named_table(registry.formatters), "",
                    "Collators (`format.collator`):", "", *named_table(registry.collators), ""]
            if RENAMED_COLLATORS:
                out += ["Old collator names read as today's, with a note: "
                        + ", ".join(f"`{old}` -> `{new}`" for old, new in RENAMED_COLLATORS.items()) + ".", ""]

    answer = [(p, c) for p, c in checks if c.scope == "answer"]
    training = [(p, c) for p, c in checks if c.scope == "training"]
    out += [
        "## expect[]",
        "",
        "Each expectation is a mapping: `prompt` plus one or more answer checks; all must hold. The answer is "
        "compared after the end-of-turn and special tokens are removed, surrounding whitespace stripped.",
        "",
        "| key | meaning |",
        "| --- | --- |",
    ]
    about = {
        "prompt": "**required**. A string is one user turn; a list of `{role, content}` turns is a chat "
                  "ending with the user turn to answer",
        "before": "a mapping of answer checks applied to the base model's answer (before training)",
        "xfail": "this expectation is expected to fail (the spec's other checks are not): a reason, `true`, or "
                 "`{reason, strict}`; reported xfailed, or xpassed when it passes (a failure with `strict: true`)",
    }
    out += [f"| `{key}` | {about.get(key, '')} |" for key in EXPECTATION_KEYS]
    out += ["", "### Answer checks (in `expect[]` and `before:`)", "", *check_table(answer), "",
            "## checks", "",
            "Training-level checks, as a mapping at the top level (e.g. `checks: {loss_decreased: true}`).", "",
            *check_table(training), "",
            "Plugins add checks through `sft_spec_register_checks` (see [writing-plugins.md](writing-plugins.md)); "
            "`sft-spec plugins` lists every check installed.", ""]

    out += [
        "## training",
        "",
        "A mapping of `trl.SFTConfig` (and so `transformers.TrainingArguments`) fields. Names and value types "
        "are checked against the installed TRL, so a typo is an error with a did-you-mean hint; values TRL "
        "would accept and then fail on (a batch size of 0, a NaN learning rate, `max_length: 1`) are errors "
        "at their key. Every field is classified once (`src/sft_spec_plugins/train/recipe_policy.py`): "
        "passed to `SFTConfig` as "
        "written, a path (inside the spec's folder), honoured by sft-spec itself, managed (sft-spec's value "
        "is used, and a spec that sets another gets a note in every report saying so), or refused.",
        "",
        "Defaults the harness uses where a spec does not say otherwise:",
        "",
        "| field | harness default |",
        "| --- | --- |",
        *[f"| `{k}` | {yaml_value(v)} |" for k, v in HARNESS_DEFAULTS.items()],
        "",
        "(`gradient_checkpointing` is passed as `activation_checkpointing` where transformers has that name.)",
        "",
        "Always set by the harness:",
        "",
        "| field | value |",
        "| --- | --- |",
        *[f"| `{k}` | {yaml_value(v)} |" for k, v in FORCED.items()],
        "",
        *policy_tables(recipe_policy.TRAINING),
        "Old names, read as the new name with a note where the installed TRL has it:",
        "",
        "| old name | new name |",
        "| --- | --- |",
        *[f"| `{k}` | `{v}` |" for k, v in RENAMED_TRAINING_KEYS.items()],
        "",
        "## lora",
        "",
        "A mapping of `peft.LoraConfig` fields (for `method: lora` and `qlora`), checked against the "
        "installed peft and classified like `training`:",
        "",
        *policy_tables(recipe_policy.LORA),
        "## quantization",
        "",
        "A mapping of `transformers.BitsAndBytesConfig` arguments for `method: qlora` (default: nf4 4-bit "
        "with double quantization; `{load_in_8bit: true}` trains LoRA on LLM.int8 layers instead). Where "
        "quantized loading does not work on the machine, `--on-unsupported` decides: LoRA on the "
        "unquantized model with a note (default), skip or error.",
        "",
        "## Directory defaults",
        "",
        f"A file `{DEFAULTS_NAME}` in a spec's folder or any folder above it, up to the project's root (the "
        "nearest folder with `pyproject.toml`, `.git`, `setup.cfg`, `tox.ini` or `pytest.ini`), is deep-merged "
        "under the spec; nearer files win. It holds the same keys as a spec. The same files apply whatever path "
        "`sft-spec run` or `pytest` is given.",
        "",
    ]
    return "\n".join(out)


def policy_tables(table: dict[str, tuple[str, str]]) -> list[str]:
    """The policy table of training or lora, one table per kind (passed fields as one line)."""
    titles = {"path": "Paths (inside the spec's folder), then passed:", "sft-spec": "Honoured by sft-spec itself:",
              "managed": "Managed by sft-spec (a spec's value is replaced, with a note):",
              "refused": "Refused (an error at the key):"}
    passed = sorted(name for name, (kind, _) in table.items() if kind == "passed")
    out = ["Passed as written: " + ", ".join(f"`{name}`" for name in passed) + ".", ""]
    for kind, title in titles.items():
        rows = sorted((name, why) for name, (k, why) in table.items() if k == kind)
        if rows:
            out += [title, "", "| field | how / why |", "| --- | --- |",
                    *[f"| `{n}` | {cell(w)} |" for n, w in rows], ""]
    return out


def named_table(table: dict) -> list[str]:
    rows = ["| name | plugin | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{n.name}` | {n.plugin} | {cell(n.description)} |" for n in table.values()]
    return rows


def check_table(checks: list[tuple[str, Any]]) -> list[str]:
    rows = ["| check | plugin | holds when |", "| --- | --- | --- |"]
    rows += [f"| `{c.name}` | {plugin} | {cell(c.description)} |" for plugin, c in checks]
    return rows


# -- files quoted in a page -------------------------------------------------------------------------


def refresh_quotes(text: str) -> str:
    """The page with every quoted file block replaced by the file's current text."""
    return QUOTE.sub(lambda m: m.group(1) + (REPO / m.group(2)).read_text(encoding="utf-8") + m.group(4), text)


# -- hooks.md skeleton -------------------------------------------------------------------------------


def hook_signature(fn) -> str:
    return f"{fn.__name__}({', '.join(inspect.signature(fn).parameters)})"


def hookspec_functions() -> list[Any]:
    from sft_spec import hookspecs

    return [fn for name, fn in vars(hookspecs).items() if name.startswith("sft_spec_") and callable(fn)
            and hasattr(fn, "sft_spec_spec")]


def hooks_skeleton(existing: str = "") -> str:
    """Sections for hooks the page lacks, from the hookspec docstrings; examples are left to write."""
    documented = set(re.findall(r"^## (sft_spec_\w+)\(", existing, re.M))
    parts = []
    for fn in hookspec_functions():
        if fn.__name__ in documented:
            continue
        first = "yes" if fn.sft_spec_spec.get("firstresult") else "no"
        doc = inspect.cleandoc(fn.__doc__ or "")
        parts.append(f"## {hook_signature(fn)}\n\nfirstresult: {first}\n\n{doc}\n\n```python\n# example\n```\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated page is stale")
    parser.add_argument("--hooks-skeleton", action="store_true", help="print sections missing from hooks.md")
    options = parser.parse_args(argv)
    if options.hooks_skeleton:
        print(hooks_skeleton(HOOKS.read_text(encoding="utf-8") if HOOKS.exists() else ""))
        return 0
    pages = {REFERENCE: render_reference(), WALKTHROUGH: refresh_quotes(WALKTHROUGH.read_text(encoding="utf-8"))}
    stale = [path for path, text in pages.items()
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    if options.check:
        for path in stale:
            print(f"{path} is stale: run `{SCRIPT}`", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(pages[path], encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
