"""Pydantic's validation errors in the words of the spec format, each located at its key.

``expected a mapping with keys conversations, files, got string 'hello'`` instead of pydantic's
``Input should be a valid dictionary or instance of DataSpec``; errors sorted in file order, as a
compiler lists them; a typo's "missing required key" dropped where its did-you-mean explains it.
"""

from __future__ import annotations

import re
import typing
from typing import Any

import pydantic

from ..errors import SpecError, did_you_mean
from ..spec import Spec
from .yamlsource import KeyPath, LocatedDocument

ModelsAt = dict[tuple[str, ...], type[pydantic.BaseModel]]


def kind_of(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def keypath_str(keypath: KeyPath) -> str:
    out = ""
    for part in keypath:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def models_at(model: type[pydantic.BaseModel], prefix: tuple[str, ...] = ()) -> ModelsAt:
    """The pydantic model at every mapping's key path (lists and optionals looked through), for messages
    that name the keys a mapping takes."""
    out: ModelsAt = {prefix: model}
    for name, field in model.model_fields.items():
        stack = [field.annotation]
        while stack:
            annotation = stack.pop()
            if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
                out.update(models_at(annotation, (*prefix, name)))
            else:
                stack.extend(typing.get_args(annotation))
    return out


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


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr`` cut to one readable line: a message must not echo a whole data structure."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pydantic_errors(exc: pydantic.ValidationError, doc: LocatedDocument, model_at: ModelsAt | None = None,
                    prefix: KeyPath = (), also_known: list[str] = ()) -> list[SpecError]:
    """Pydantic's errors as located spec errors, in the spec format's words (not pydantic's class names).

    ``prefix`` is where the validated value sits in the document (a plugin's section: ``("launcher",)``);
    ``also_known`` are keys valid beside the model's at that level (plugins' top-level keys).
    """
    model_at = models_at(Spec) if model_at is None else model_at
    data: Any = doc.data
    for part in prefix:
        data = data[part]
    errors = []
    for err in exc.errors():
        keypath = prefix + _data_path(data, err["loc"])
        kind = err["type"]
        value = err.get("input")
        named = tuple(p for p in keypath if not isinstance(p, int))
        if kind == "extra_forbidden":
            key = keypath[-1] if keypath else err["loc"][-1]
            parent = tuple(p for p in keypath[:-1] if not isinstance(p, int))
            known = [*model_at[parent].model_fields, *(also_known if not parent else [])] if parent in model_at else []
            message = did_you_mean(str(key), known, "key") if known else f"unknown key {key!r}"
        elif kind == "missing":
            message = f"missing required key {err['loc'][-1]!r}"
        elif kind == "invalid_key" or err["loc"][-1:] == ("[key]",):
            key = keypath[-1] if keypath else err["loc"][-1]
            message = f"keys must be strings, got {kind_of(key)} {short_repr(key)}"
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            message = f"invalid value {short_repr(value)}; expected {expected}"
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
            message = f"expected {wanted}, got {kind_of(value)} {short_repr(value)}"
        else:
            message = f"{err['msg'][0].lower()}{err['msg'][1:]}, got {kind_of(value)} {short_repr(value)}"
        errors.append(SpecError(message, doc.locate(keypath), key=keypath_str(keypath) or None))
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
