"""One spec item from one variant's merged document: schema, plugins' checks, names, files, cases."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic

from ..errors import SpecError, SpecErrors, did_you_mean
from ..spec import Spec
from ..state import SpecItem
from .data import resolve_conversations
from .expectations import build_expectations, build_training_checks, plugin_validate
from .paths import check_inside
from .wording import pydantic_errors
from .yamlsource import LocatedDocument

if TYPE_CHECKING:
    from . import LoadContext


def _sections(data: dict, doc: LocatedDocument, ctx: LoadContext, errors: list[SpecError]) -> dict[str, Any]:
    """Plugins' top-level keys, taken out of ``data`` and validated with each plugin's model."""
    out: dict[str, Any] = {}
    for name, section in ctx.config.registry.sections.items():
        if name not in data:
            continue
        value = data.pop(name)
        if section.shorthand is not None:
            value = section.shorthand(value)
            doc.data[name] = value
        if value is None:
            continue
        try:
            out[name] = section.model.model_validate(value)  # type: ignore[attr-defined]
        except pydantic.ValidationError as exc:
            errors.extend(pydantic_errors(exc, doc, {(name,): section.model}, prefix=(name,)))
    return out


def _validate_by_plugins(item: SpecItem, ctx: LoadContext) -> list[SpecError]:
    errors = []
    for results in ctx.config.hook.sft_spec_validate_spec(item=item, config=ctx.config):
        for problem in results or []:
            errors.append(problem if isinstance(problem, SpecError) else SpecError(str(problem), item.location))
    return errors


def _check_names(item: SpecItem, ctx: LoadContext) -> list[SpecError]:
    """The formatter, collator and model loader a spec names exist, and accept what the spec says."""
    registry = ctx.config.registry
    spec, errors = item.spec, []
    fmt = spec.format
    for key, name, table in (("formatter", fmt.formatter, registry.formatters),
                             ("collator", fmt.collator, registry.collators)):
        where = item.locate("format", key)
        if name not in table:
            errors.append(SpecError(did_you_mean(name, list(table), key), where, key=f"format.{key}"))
            continue
        problem = plugin_validate(getattr(table[name].obj, "validate", None), fmt, f"{key} {name!r}")
        if problem:
            errors.append(SpecError(problem, where, key=f"format.{key}"))
    loader = registry.loader_for(spec.model)
    where = item.locate("model", "id") if isinstance((item.doc.data if item.doc else {}).get("model"), dict) \
        else item.locate("model")
    if loader is None:
        errors.append(SpecError(f"no model loader accepts {spec.model.id!r}", where, key="model"))
    else:
        problem = plugin_validate(getattr(loader.obj, "validate", None), spec.model, "the model loader")
        if problem:
            errors.append(SpecError(problem, where, key="model"))
    return errors


def _template(item: SpecItem, errors: list[SpecError]) -> str | None:
    """``format.template``: inline Jinja2, or a file inside the spec's folder."""
    template = item.spec.format.template
    if template is None:
        return None
    if "{{" in template or "{%" in template or "\n" in template:
        return template
    where = item.locate("format", "template")
    try:
        return check_inside(item.folder, template, "template").read_text(encoding="utf-8")
    except ValueError as exc:
        errors.append(SpecError(str(exc), where, key="format.template"))
    except OSError as exc:
        errors.append(SpecError(f"cannot read template file {template!r}: {exc.strerror}", where,
                                key="format.template"))
    return None


def build_item(path: Path, nodeid: str, name: str, variant: str | None, doc: LocatedDocument,
               ctx: LoadContext) -> SpecItem:
    errors: list[SpecError] = []
    doc = LocatedDocument(copy.deepcopy(doc.data), dict(doc.locations), doc.path)  # this item's own copy
    data = dict(doc.data)
    sections = _sections(data, doc, ctx, errors)
    try:
        spec = Spec.model_validate(data)
    except pydantic.ValidationError as exc:
        raise SpecErrors(errors + pydantic_errors(exc, doc)) from None
    spec.name = name
    item = SpecItem(nodeid=nodeid, path=path, name=name, variant=variant, spec=spec, conversations=[],
                    expectations=[], training_checks=[], location=doc.locate(()), doc=doc, sections=sections)
    errors += _validate_by_plugins(item, ctx)  # may normalise (old names) before names are looked up
    errors += _check_names(item, ctx)
    item.chat_template = _template(item, errors)
    item.conversations = resolve_conversations(item, ctx, errors)
    item.expectations = build_expectations(spec, nodeid, doc, ctx, errors)
    item.training_checks = build_training_checks(spec, nodeid, doc, ctx, errors)
    if not spec.expect and not spec.checks:
        # A spec that checks nothing passes whatever training did: almost always a forgotten section.
        where = doc.locate(("expect",)) if "expect" in doc.data else doc.locate(())
        errors.append(SpecError("nothing to check: add expect (prompts with equals, contains, regex, ...) or "
                                "checks (e.g. loss_decreased: true)", where,
                                key="expect" if "expect" in doc.data else None))
    if errors:
        raise SpecErrors(errors)
    return item
