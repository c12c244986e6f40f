"""From a ``*.sft.yaml`` file to validated spec items, or to errors that name ``file:line:column``.

Steps: parse (located YAML) -> merge ``sft-defaults.yaml`` files under it -> expand ``matrix`` ->
validate each variant (pydantic model, then TRL/peft field lists, plugin names, checks, data files).
Every problem in a file is collected, so one run shows them all.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic

from .errors import Location, SpecError, SpecErrors, did_you_mean, relpath
from .recipe_fields import (
    MANAGED_LORA_KEYS,
    MANAGED_TRAINING_KEYS,
    RENAMED_COLLATORS,
    RENAMED_TRAINING_KEYS,
    check_value,
    recipe_fields,
)
from .registry import Check, Registry
from .spec import DataFile, DataSpec, FormatSpec, GenerationSpec, Message, ModelSpec, Spec, XfailSpec, xfail_shorthand
from .yamlsource import KeyPath, LocatedDocument, load_yaml_file

SPEC_SUFFIXES = (".sft.yaml", ".sft.yml")
DEFAULTS_NAME = "sft-defaults.yaml"
#: A data file larger than this is refused: a spec is a test, not a training job.
MAX_DATA_BYTES = 64 * 1024 * 1024
ROLES = ("system", "user", "assistant")
EXPECTATION_KEYS = ("prompt", "before", "xfail")


def is_spec_file(path: Path) -> bool:
    return path.name.endswith(SPEC_SUFFIXES)


def spec_stem(path: Path) -> str:
    for suffix in SPEC_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


@dataclass
class Expectation:
    index: int
    nodeid: str
    prompt: list[dict]
    checks: list[tuple[str, Any]]
    before: list[tuple[str, Any]]
    location: Location
    selected: bool = True
    xfail: XfailSpec | None = None  # this check is expected to fail (the spec's other checks are not)

    @property
    def needs_base_answer(self) -> bool:
        return bool(self.before)

    def describe(self) -> str:
        """``equals '我学会了'; before: not_equals '我学会了'``"""
        parts = [f"{name} {arg!r}" for name, arg in self.checks]
        if self.before:
            parts.append("before: " + ", ".join(f"{n} {a!r}" for n, a in self.before))
        return "; ".join(parts)

    @property
    def prompt_text(self) -> str:
        if len(self.prompt) == 1:
            return self.prompt[0]["content"]
        return " | ".join(f"{m['role']}: {m['content']}" for m in self.prompt)


@dataclass
class SpecItem:
    """One runnable spec: a file's spec with one matrix entry applied."""

    nodeid: str
    path: Path
    name: str
    variant: str | None
    spec: Spec
    conversations: list[list[dict]]
    expectations: list[Expectation]
    training_checks: list[tuple[str, Any, Location]]
    location: Location
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)
    doc: LocatedDocument | None = None

    @property
    def tags(self) -> list[str]:
        return self.spec.tags

    @property
    def selected_expectations(self) -> list[Expectation]:
        return [e for e in self.expectations if e.selected]


@dataclass
class LoadContext:
    registry: Registry
    cache_dir: Path
    rootdir: Path
    _defaults: dict[Path, LocatedDocument | None] = field(default_factory=dict)


# -- merging -----------------------------------------------------------------------------------------


def deep_merge(base: Any, over: Any) -> Any:
    """Mappings merge key by key; anything else in ``over`` replaces ``base`` (lists included)."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(over)


def _merge_docs(base: LocatedDocument, over: LocatedDocument) -> LocatedDocument:
    locations = dict(base.locations)
    locations.update(over.locations)
    return LocatedDocument(deep_merge(base.data, over.data), locations, over.path)


def _defaults_for(spec_path: Path, ctx: LoadContext) -> list[LocatedDocument]:
    """``sft-defaults.yaml`` files from the root down to the spec's folder (nearer ones merge last)."""
    found = []
    directory = spec_path.parent.resolve()
    root = ctx.rootdir.resolve()
    while True:
        if directory not in ctx._defaults:
            candidate = directory / DEFAULTS_NAME
            doc = None
            if candidate.is_file():
                doc = load_yaml_file(candidate, relpath(candidate))
                if doc.data is None:
                    doc = None
                elif not isinstance(doc.data, dict):
                    raise SpecError("sft-defaults.yaml must hold a mapping of spec keys", doc.locate(()))
            ctx._defaults[directory] = doc
        if ctx._defaults[directory] is not None:
            found.append(ctx._defaults[directory])
        if directory == root or root not in directory.parents:
            break
        directory = directory.parent
    return list(reversed(found))


# -- the loader --------------------------------------------------------------------------------------


def load_spec_file(path: Path, ctx: LoadContext) -> list[SpecItem]:
    """Load one spec file into items; raise :class:`SpecErrors` with every problem found."""
    shown = relpath(path)
    doc = load_yaml_file(path, shown)
    if doc.data is None:
        raise SpecError("the spec file is empty: it needs at least model, data and expect",
                        Location(shown, 1, 1))
    if not isinstance(doc.data, dict):
        raise SpecError(
            f"a spec file holds a mapping of keys (name, model, data, expect, ...), not a {_kind(doc.data)}",
            doc.locate(()),
        )
    for defaults in reversed(_defaults_for(path, ctx)):
        doc = _merge_docs(defaults, doc) if defaults is not None else doc
    # The spec file's own path is what items are named after, whatever the defaults said.
    doc.path = shown
    name = doc.data.get("name") or spec_stem(path)
    if not isinstance(name, str):
        raise SpecError("expected a string", doc.locate(("name",)), key="name")

    variants = _expand_matrix(doc)
    items: list[SpecItem] = []
    errors: list[SpecError] = []
    for variant in variants:
        nodeid = f"{shown}::{name}" + (f"[{variant.id}]" if variant.id else "")
        try:
            items.append(_build_item(path, nodeid, name, variant.id, variant.doc, ctx))
        except SpecErrors as exc:
            errors.extend(_tag_variant(exc.errors, variant, len(variants)))
        except SpecError as exc:
            errors.extend(_tag_variant([exc], variant, len(variants)))
    if errors:
        raise SpecErrors(_dedupe(errors))
    return items


@dataclass
class _Variant:
    id: str | None
    doc: LocatedDocument
    index: int = -1
    #: Where this matrix entry's own keys were written: errors there are named ``matrix[i].key``.
    written: frozenset[Location] = frozenset()


def _tag_variant(errors: list[SpecError], variant: _Variant, count: int) -> list[SpecError]:
    out = []
    for e in errors:
        key = e.key
        if e.location in variant.written and not (key or "").startswith("matrix["):
            key = f"matrix[{variant.index}]" + (f".{key}" if key else "")
        message = e.message
        if variant.id and count > 1:
            message += f" (matrix entry {variant.id!r})"
        out.append(SpecError(message, e.location, key))
    return out


def _dedupe(errors: list[SpecError]) -> list[SpecError]:
    """Matrix entries repeat the base spec's problems: report each location and message once."""
    seen, out = set(), []
    for e in errors:
        base = re.sub(r" \(matrix entry '[^']*'\)$", "", e.message)
        key = (str(e.location), e.key, base)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _expand_matrix(doc: LocatedDocument) -> list[_Variant]:
    matrix = doc.data.get("matrix")
    if matrix is None or matrix == []:
        return [_Variant(None, doc)]
    if not isinstance(matrix, list):
        raise SpecError(f"expected a list of entries, got {_kind(matrix)}", doc.locate(("matrix",)),
                        key="matrix")
    base = LocatedDocument({k: v for k, v in doc.data.items() if k != "matrix"}, doc.locations, doc.path)
    seen: dict[str, int] = {}
    out, errors = [], []
    for i, entry in enumerate(matrix):
        where = doc.locate(("matrix", i))
        if not isinstance(entry, dict):
            errors.append(SpecError(f"a matrix entry is a mapping with an id, not a {_kind(entry)}", where,
                                    key=f"matrix[{i}]"))
            continue
        entry_id = entry.get("id")
        if entry_id is None:
            errors.append(SpecError("a matrix entry needs an id (used in the test id: name[id])", where,
                                    key=f"matrix[{i}]"))
            continue
        if (not isinstance(entry_id, str | int) or isinstance(entry_id, bool)
                or not re.fullmatch(r"[\w.\-+]+", str(entry_id))):
            errors.append(SpecError("id must be a short name of letters, digits, '_', '-', '.' or '+'",
                                    doc.locate(("matrix", i, "id")), key=f"matrix[{i}].id"))
            continue
        entry_id = str(entry_id)
        if entry_id in seen:
            errors.append(SpecError(f"duplicate matrix id {entry_id!r} (first at matrix[{seen[entry_id]}])",
                                    doc.locate(("matrix", i, "id")), key=f"matrix[{i}].id"))
            continue
        seen[entry_id] = i
        for forbidden in ("matrix", "name"):
            if forbidden in entry:
                errors.append(SpecError(f"a matrix entry cannot set {forbidden!r}",
                                        doc.locate(("matrix", i, forbidden)), key=f"matrix[{i}].{forbidden}"))
        over_data = {k: v for k, v in entry.items() if k != "id"}
        over_locs = {
            tuple(p[2:]): loc for p, loc in doc.locations.items()
            if len(p) > 2 and p[0] == "matrix" and p[1] == i
        }
        out.append(_Variant(entry_id, _merge_docs(base, LocatedDocument(over_data, over_locs, doc.path)), i,
                            frozenset(over_locs.values())))
    if errors:
        raise SpecErrors(errors)
    return out


def _kind(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _keypath_str(keypath: KeyPath) -> str:
    out = ""
    for part in keypath:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_MODELS_AT: dict[tuple[str, ...], type[pydantic.BaseModel]] = {
    (): Spec,
    ("model",): ModelSpec,
    ("format",): FormatSpec,
    ("data",): DataSpec,
    ("data", "files"): DataFile,
    ("data", "conversations"): Message,
    ("generation",): GenerationSpec,
    ("xfail",): XfailSpec,
}


def _data_path(data: Any, loc: tuple) -> KeyPath:
    """Pydantic's error location without its union tags (``list[Message]``), as a path into the data."""
    out: list[str | int] = []
    current = data
    for part in loc:
        if isinstance(current, dict) and part in current:
            out.append(part)
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            out.append(part)
            current = current[part]
    return tuple(out)


#: What a pydantic error type asks for, in the words of the spec format.
_EXPECTED = {
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "list_type": "a list", "string_type": "a string", "int_type": "an integer", "int_parsing": "an integer",
    "int_from_float": "a whole number", "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false",
}
#: Shorthands a section also accepts, so the message names every form that works.
_SHORTHANDS = {
    ("model",): "a model id (builtin:NAME, a hub id, a folder or a .gguf file) or a mapping with id",
    ("xfail",): "a reason (string), true, or a mapping with reason and strict",
    ("tags",): "a tag or a list of tags",
    ("skip",): "a reason (string) or true",
    ("expect",): "a list of expectations (each a mapping with prompt and checks)",
    ("data", "conversations"): "a list of conversations (each a list of {role, content} turns)",
    ("data", "files"): "a list of data files (each a mapping with path)",
    ("matrix",): "a list of entries (each a mapping with id)",
    ("training",): "a mapping of trl.SFTConfig fields",
    ("lora",): "a mapping of peft.LoraConfig fields",
    ("quantization",): "a mapping of transformers.BitsAndBytesConfig fields",
    ("checks",): "a mapping of training checks, e.g. {loss_decreased: true}",
}


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` cut to one readable line: a message must not echo a whole data structure."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


ModelsAt = dict[tuple[str, ...], type[pydantic.BaseModel]]


def _pydantic_errors(exc: pydantic.ValidationError, doc: LocatedDocument,
                     model_at: ModelsAt | None = None) -> list[SpecError]:
    """Pydantic's errors as located spec errors, in the spec format's words (not pydantic's class names)."""
    model_at = _MODELS_AT if model_at is None else model_at
    errors = []
    for err in exc.errors():
        keypath = _data_path(doc.data, err["loc"])
        kind = err["type"]
        value = err.get("input")
        named = tuple(p for p in keypath if not isinstance(p, int))
        if kind == "extra_forbidden":
            key = keypath[-1] if keypath else err["loc"][-1]
            parent = tuple(p for p in keypath[:-1] if not isinstance(p, int))
            known = list(model_at[parent].model_fields) if parent in model_at else []
            message = did_you_mean(str(key), known, "key") if known else f"unknown key {key!r}"
        elif kind == "missing":
            message = f"missing required key {err['loc'][-1]!r}"
        elif kind == "invalid_key" or err["loc"][-1:] == ("[key]",):
            key = keypath[-1] if keypath else err["loc"][-1]
            message = f"keys must be strings, got {_kind(key)} {_short(key)}"
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            message = f"invalid value {_short(value)}; expected {expected}"
            if isinstance(value, str):
                choices = re.findall(r"'([^']*)'", expected)
                close = did_you_mean(value, choices, "value")
                if "Did you mean" in close:
                    message += ". " + close.split(". ", 1)[1].split(" Available")[0]
        elif kind in _EXPECTED:
            wanted = _SHORTHANDS.get(named) if kind in ("dict_type", "model_type", "list_type") else None
            if wanted is None:
                wanted = _EXPECTED[kind]
                model = model_at.get(named)
                if model is not None and wanted == "a mapping":
                    wanted += f" with keys {', '.join(model.model_fields)}"
            message = f"expected {wanted}, got {_kind(value)} {_short(value)}"
        else:
            message = f"{err['msg'][0].lower()}{err['msg'][1:]}, got {_kind(value)} {_short(value)}"
        errors.append(SpecError(message, doc.locate(keypath), key=_keypath_str(keypath) or None))
    # In file order, as a compiler lists them (pydantic orders by model field instead).
    errors.sort(key=lambda e: (e.location.line, e.location.column) if e.location else (0, 0))
    return _drop_missing_explained_by_typo(errors)


def _drop_missing_explained_by_typo(errors: list[SpecError]) -> list[SpecError]:
    """``modle:`` is one mistake, not two: keep "unknown key 'modle'. Did you mean: model?" and drop
    "missing required key 'model'" for the same mapping."""
    hinted = set()
    for e in errors:
        match = re.match(r"unknown key .*?\. Did you mean: ([^?]*)\?", e.message)
        if match:
            parent = (e.key or "").rpartition(".")[0] if "." in (e.key or "") else ""
            hinted.update((parent, name.strip()) for name in match.group(1).split(","))
    out = []
    for e in errors:
        match = re.fullmatch(r"missing required key '([^']*)'", e.message)
        if match and ((e.key or ""), match.group(1)) in hinted:
            continue
        out.append(e)
    return out


def _build_item(path: Path, nodeid: str, name: str, variant: str | None, doc: LocatedDocument,
                ctx: LoadContext) -> SpecItem:
    notes: list[str] = []
    errors: list[SpecError] = []
    data = doc.data
    _rename_old_keys(data, doc, notes, errors, ctx)
    try:
        spec = Spec.model_validate(data)
    except pydantic.ValidationError as exc:
        raise SpecErrors(errors + _pydantic_errors(exc, doc)) from None
    spec.name = name
    errors += _check_recipe_fields(spec, doc, ctx)
    errors += _check_plugins(spec, doc, ctx)
    chat_template = _resolve_template(spec, path, doc, ctx, errors)
    conversations = _resolve_conversations(spec, path, doc, ctx, errors)
    expectations = _build_expectations(spec, nodeid, doc, ctx, errors)
    training_checks = _build_training_checks(spec, doc, ctx, errors)
    if not spec.expect and not spec.checks:
        # A spec that checks nothing passes whatever training did: almost always a forgotten section.
        where = doc.locate(("expect",)) if "expect" in data else doc.locate(())
        errors.append(SpecError("nothing to check: add expect (prompts with equals, contains, regex, ...) or "
                                "checks (e.g. loss_decreased: true)", where,
                                key="expect" if "expect" in data else None))
    if errors:
        raise SpecErrors(errors)
    return SpecItem(
        nodeid=nodeid, path=path, name=name, variant=variant, spec=spec, conversations=conversations,
        expectations=expectations, training_checks=training_checks, location=doc.locate(()),
        chat_template=chat_template, notes=notes, doc=doc,
    )


def _rename_old_keys(data: dict, doc: LocatedDocument, notes: list[str], errors: list[SpecError],
                     ctx: LoadContext) -> None:
    training = data.get("training")
    if isinstance(training, dict) and any(old in training for old in RENAMED_TRAINING_KEYS):
        known = recipe_fields(ctx.cache_dir)["training"]
        for old, new in RENAMED_TRAINING_KEYS.items():
            if old in training and new in known:
                where = doc.locate(("training", old))
                if new in training:
                    errors.append(SpecError(f"both {old!r} and its new name {new!r} are set; keep {new!r}",
                                            where, key=f"training.{old}"))
                    continue
                training[new] = training.pop(old)
                doc.locations[("training", new)] = where
                notes.append(f"{where}: note: training.{old} is now {new} in TRL/transformers; read as {new}")
    fmt = data.get("format")
    collator = fmt.get("collator") if isinstance(fmt, dict) else None
    if isinstance(fmt, dict) and isinstance(collator, str) and collator in RENAMED_COLLATORS:
        old = fmt["collator"]
        fmt["collator"] = RENAMED_COLLATORS[old]
        notes.append(
            f"{doc.locate(('format', 'collator'))}: note: {old} was removed from TRL; "
            f"sft-spec's {fmt['collator']!r} collator does what it did"
        )


def _check_section(section: str, values: dict, known: dict, managed: dict, doc: LocatedDocument,
                   what: str) -> list[SpecError]:
    errors = []
    for key, value in values.items():
        keypath = (section, key)
        where = doc.locate(keypath)
        if key in managed:
            errors.append(SpecError(f"{key!r} cannot be set in a spec: {managed[key]}", where,
                                    key=f"{section}.{key}"))
        elif key not in known:
            errors.append(SpecError(did_you_mean(str(key), list(known), f"{what} field"), where,
                                    key=f"{section}.{key}"))
        else:
            problem = check_value(known[key], value)
            if problem:
                errors.append(SpecError(problem, where, key=f"{section}.{key}"))
    return errors


def _check_recipe_fields(spec: Spec, doc: LocatedDocument, ctx: LoadContext) -> list[SpecError]:
    if not spec.training and not spec.lora and not spec.quantization:
        return []
    fields = recipe_fields(ctx.cache_dir)
    errors = _check_section("training", spec.training, fields["training"], MANAGED_TRAINING_KEYS, doc,
                            "trl.SFTConfig")
    errors += _check_section("lora", spec.lora, fields["lora"], MANAGED_LORA_KEYS, doc, "peft.LoraConfig")
    if spec.quantization and "quantization" in fields:
        errors += _check_section("quantization", spec.quantization, fields["quantization"], {}, doc,
                                 "transformers.BitsAndBytesConfig")
    return errors


def _check_plugins(spec: Spec, doc: LocatedDocument, ctx: LoadContext) -> list[SpecError]:
    reg = ctx.registry
    errors = []
    fmt = spec.format
    for key, name, table, what in (
        ("formatter", fmt.formatter, reg.formatters, "formatter"),
        ("collator", fmt.collator, reg.collators, "collator"),
    ):
        where = doc.locate(("format", key))
        if name not in table:
            errors.append(SpecError(did_you_mean(name, list(table), what), where, key=f"format.{key}"))
            continue
        validate = getattr(table[name].obj, "validate", None)
        problem = _plugin_validate(validate, fmt, f"{what} {name!r}")
        if problem:
            errors.append(SpecError(problem, where, key=f"format.{key}"))
    loader = reg.loader_for(spec.model)
    where = doc.locate(("model", "id")) if isinstance(doc.data.get("model"), dict) else doc.locate(("model",))
    if loader is None:
        errors.append(SpecError(f"no model loader accepts {spec.model.id!r}", where, key="model"))
    else:
        problem = _plugin_validate(getattr(loader.obj, "validate", None), spec.model, "the model loader")
        if problem:
            errors.append(SpecError(problem, where, key="model"))
    return errors


def _plugin_validate(validate: Any, value: Any, what: str) -> str | None:
    """A plugin's own validation; if it crashes on odd input, that is this spec's error, not the run's."""
    if validate is None:
        return None
    try:
        return validate(value)
    except Exception as exc:
        return f"{what} could not check this value: {type(exc).__name__}: {str(exc)[:200]}"


def resolve_inside(base_dir: Path, relative: str, root: Path) -> Path:
    """``relative`` against ``base_dir``; refuse anything that lands outside ``root``."""
    target = (base_dir / relative).resolve()
    root = root.resolve()
    if target != root and root not in target.parents:
        raise ValueError(f"path {relative!r} is outside the spec directory {relpath(root)}")
    return target


def _resolve_template(spec: Spec, path: Path, doc: LocatedDocument, ctx: LoadContext,
                      errors: list[SpecError]) -> str | None:
    template = spec.format.template
    if template is None:
        return None
    if "{{" in template or "{%" in template or "\n" in template:
        return template
    where = doc.locate(("format", "template"))
    try:
        target = resolve_inside(path.parent, template, ctx.rootdir)
        return target.read_text(encoding="utf-8")
    except ValueError as exc:
        errors.append(SpecError(str(exc), where, key="format.template"))
    except OSError as exc:
        errors.append(SpecError(f"cannot read template file {template!r}: {exc.strerror}", where,
                                key="format.template"))
    return None


def _check_conversation(turns: list[dict]) -> str | None:
    """None when roles are valid: optional system, then user/assistant alternating, ending on assistant."""
    if not turns:
        return "a conversation needs at least one user and one assistant turn"
    roles = [t["role"] for t in turns]
    for i, role in enumerate(roles):
        if role not in ROLES:
            return (f"turn {i}: unknown role {role!r} (expected one of {', '.join(ROLES)}; "
                    "map others with role_map)")
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        return f"turn {roles.index('system', 1)}: a system turn may only come first"
    for i, role in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            offset = len(roles) - len(body)
            return (f"turn {i + offset}: expected a {expected} turn, got {role!r} "
                    "(roles must alternate user/assistant)")
    if not body or body[-1] != "assistant":
        return "a training conversation must end with an assistant turn (it is what the model learns)"
    return None


def _resolve_conversations(spec: Spec, path: Path, doc: LocatedDocument, ctx: LoadContext,
                           errors: list[SpecError]) -> list[list[dict]]:
    conversations: list[list[dict]] = []
    for i, conv in enumerate(spec.data.conversations):
        turns = [m.model_dump() for m in conv]
        problem = _check_conversation(turns)
        if problem:
            errors.append(SpecError(problem, doc.locate(("data", "conversations", i)),
                                    key=f"data.conversations[{i}]"))
        conversations.append(turns)
    for i, data_file in enumerate(spec.data.files):
        where = doc.locate(("data", "files", i, "path"))
        try:
            conversations.extend(load_jsonl_conversations(path.parent, data_file, ctx.rootdir))
        except SpecError as exc:
            errors.append(SpecError(exc.message, exc.location or where, exc.key or f"data.files[{i}]"))
        except ValueError as exc:
            errors.append(SpecError(str(exc), where, key=f"data.files[{i}].path"))
    if not conversations and not errors:
        errors.append(SpecError("no training conversations: add data.conversations or data.files",
                                doc.locate(("data",)), key="data"))
    return conversations


def load_jsonl_conversations(base_dir: Path, data_file: DataFile, root: Path) -> list[list[dict]]:
    """Conversations from a JSON Lines file, keys mapped as the spec says; errors name file and line."""
    target = resolve_inside(base_dir, data_file.path, root)
    shown = relpath(target)
    if not target.is_file():
        raise SpecError(f"data file not found: {data_file.path} "
                        "(paths are relative to the spec file's folder)")
    size = target.stat().st_size
    if size > MAX_DATA_BYTES:
        raise SpecError(f"data file {data_file.path} is {_size(size)}; the limit is {_size(MAX_DATA_BYTES)} "
                        "(a spec is a test, not a training job)")
    raw = target.read_bytes()
    conversations = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = Location(shown, lineno)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            column = len(line[: exc.start].decode("utf-8", "replace")) + 1
            raise SpecError(f"line is not valid UTF-8 (byte 0x{line[exc.start]:02x})",
                            Location(shown, lineno, column)) from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"not valid JSON: {exc.msg}", Location(shown, lineno, exc.colno)) from None
        except (ValueError, RecursionError) as exc:  # huge integers, nesting deeper than Python recurses
            raise SpecError(f"not valid JSON: {type(exc).__name__}: {str(exc)[:100]}", where) from None
        if not isinstance(record, dict):
            raise SpecError(f"each line must be a JSON object, got {_kind(record)}", where)
        if data_file.conversation_key not in record:
            raise SpecError(did_you_mean(data_file.conversation_key, list(record), "conversation_key")
                            .replace("unknown conversation_key", "no conversation_key"), where)
        turns_raw = record[data_file.conversation_key]
        if not isinstance(turns_raw, list):
            raise SpecError(f"{data_file.conversation_key!r} must be a list of turns", where)
        turns = []
        for t, turn in enumerate(turns_raw):
            if not isinstance(turn, dict):
                raise SpecError(f"turn {t} must be an object", where)
            for key in (data_file.role_key, data_file.content_key):
                if key not in turn:
                    raise SpecError(f"turn {t} has no {key!r} key (keys: {', '.join(map(str, turn))}); "
                                    "set role_key/content_key", where)
            role, content = turn[data_file.role_key], turn[data_file.content_key]
            if not isinstance(content, str) or not isinstance(role, str):
                raise SpecError(f"turn {t}: role and content must be strings", where)
            role = data_file.role_map.get(role, role)
            turns.append({"role": role, "content": content})
        problem = _check_conversation(turns)
        if problem:
            raise SpecError(problem, where)
        conversations.append(turns)
    if not conversations:
        # No line to point at in the data file: point at the spec's path key instead.
        raise SpecError(f"data file {data_file.path} holds no conversations (each line: one JSON object with "
                        f"{data_file.conversation_key!r})")
    return conversations


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _parse_checks(entry: dict, keypath: KeyPath, doc: LocatedDocument, ctx: LoadContext,
                  errors: list[SpecError], allowed: tuple[str, ...]) -> list[tuple[str, Any]]:
    checks = []
    answer_checks = [n for n, c in ctx.registry.checks.items() if c.scope == "answer"]
    for key, value in entry.items():
        if key in allowed:
            continue
        where = doc.locate(keypath + (key,))
        dotted = _keypath_str(keypath + (key,))
        check: Check | None = ctx.registry.checks.get(str(key))
        if check is None or check.scope != "answer":
            errors.append(SpecError(did_you_mean(str(key), answer_checks + list(allowed), "check"), where,
                                    key=dotted))
            continue
        problem = _plugin_validate(check.validate, value, f"check {check.name!r}")
        if problem:
            errors.append(SpecError(problem, where, key=dotted))
            continue
        checks.append((str(key), value))
    return checks


def _build_expectations(spec: Spec, nodeid: str, doc: LocatedDocument, ctx: LoadContext,
                        errors: list[SpecError]) -> list[Expectation]:
    out = []
    for i, entry in enumerate(spec.expect):
        keypath: KeyPath = ("expect", i)
        where = doc.locate(keypath)
        if "prompt" not in entry:
            errors.append(SpecError("an expectation needs a prompt", where, key=f"expect[{i}]"))
            continue
        prompt = _parse_prompt(entry["prompt"], keypath + ("prompt",), doc, errors)
        checks = _parse_checks(entry, keypath, doc, ctx, errors, EXPECTATION_KEYS)
        before: list[tuple[str, Any]] = []
        if "before" in entry:
            if not isinstance(entry["before"], dict) or not entry["before"]:
                errors.append(SpecError("before: expected a mapping of checks, e.g. {not_equals: ...}",
                                        doc.locate(keypath + ("before",)), key=f"expect[{i}].before"))
            else:
                before = _parse_checks(entry["before"], keypath + ("before",), doc, ctx, errors, ())
        if not checks and not before and not any(k not in EXPECTATION_KEYS for k in entry):
            errors.append(SpecError("an expectation needs at least one check (equals, contains, regex, ...)",
                                    where, key=f"expect[{i}]"))
        xfail = None
        if "xfail" in entry:
            xfail = _parse_xfail(entry["xfail"], doc.locate(keypath + ("xfail",)), f"expect[{i}].xfail", errors)
        if prompt is not None:
            out.append(Expectation(i, f"{nodeid}::expect[{i}]", prompt, checks, before, where, xfail=xfail))
    return out


def _parse_xfail(value: Any, where: Location, dotted: str, errors: list[SpecError]) -> XfailSpec | None:
    """An expectation's ``xfail``: the same forms as the spec's (a reason, true, or {reason, strict})."""
    if value is False or value is None:
        return None
    try:
        return XfailSpec.model_validate(xfail_shorthand(value))
    except pydantic.ValidationError:
        errors.append(SpecError("expected a reason (string), true, or a mapping with reason and strict",
                                where, key=dotted))
        return None


def _parse_prompt(value: Any, keypath: KeyPath, doc: LocatedDocument,
                  errors: list[SpecError]) -> list[dict] | None:
    where = doc.locate(keypath)
    dotted = _keypath_str(keypath)
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        turns = []
        for j, turn in enumerate(value):
            try:
                turns.append(Message.model_validate(turn).model_dump())
            except pydantic.ValidationError as exc:
                turn_doc = LocatedDocument(turn, {(): doc.locate(keypath + (j,))}, doc.path)
                for e in _pydantic_errors(exc, turn_doc, {(): Message}):
                    errors.append(SpecError(e.message, doc.locate(keypath + (j,)), key=f"{dotted}[{j}]"))
                return None
        if turns[-1]["role"] != "user":
            errors.append(SpecError(f"the last turn of a prompt must be a user turn (the model answers it), "
                                    f"got {turns[-1]['role']!r}", where, key=dotted))
            return None
        problem = _check_conversation(turns + [{"role": "assistant", "content": ""}])
        if problem:
            errors.append(SpecError(problem.replace("must end with an assistant", "must end with a user")
                                    + " (a prompt ends with the user turn to answer)", where, key=dotted))
            return None
        return turns
    errors.append(SpecError("prompt must be a string (one user turn) or a list of {role, content} turns",
                            where, key=dotted))
    return None


def _build_training_checks(spec: Spec, doc: LocatedDocument, ctx: LoadContext,
                           errors: list[SpecError]) -> list[tuple[str, Any, Location]]:
    out = []
    training_checks = [n for n, c in ctx.registry.checks.items() if c.scope == "training"]
    for key, value in spec.checks.items():
        where = doc.locate(("checks", key))
        check = ctx.registry.checks.get(key)
        if check is None or check.scope != "training":
            errors.append(SpecError(did_you_mean(key, training_checks, "training check"), where,
                                    key=f"checks.{key}"))
            continue
        problem = _plugin_validate(check.validate, value, f"check {check.name!r}")
        if problem:
            errors.append(SpecError(problem, where, key=f"checks.{key}"))
            continue
        out.append((key, value, where))
    return out
