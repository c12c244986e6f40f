"""One spec item from one variant's merged document: the schema, plugins' sections and checks, cases."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic

from ..errors import SpecError, SpecErrors
from ..spec import Spec
from ..state import SpecItem
from .expectations import build_expectations, build_training_checks
from .wording import models_at, pydantic_errors
from .yamlsource import LocatedDocument

if TYPE_CHECKING:
    from . import LoadContext


def _sections(data: dict, doc: LocatedDocument, ctx: LoadContext, errors: list[SpecError]) -> dict[str, Any]:
    """Plugins' top-level keys, taken out of ``data`` and validated with each plugin's model."""
    out: dict[str, Any] = {}
    for name, section in ctx.config.registry.sections.items():
        value = data.pop(name, None)
        if value is not None and section.shorthand is not None:
            value = doc.data[name] = section.shorthand(value)
        if value is None:  # left out, or written empty (``format:``): the same
            if section.required:
                errors.append(SpecError(f"missing required key {name!r}", doc.locate((name,))))
            elif section.default:
                out[name] = section.model()  # type: ignore[call-arg]
            continue
        try:
            out[name] = section.model.model_validate(value)  # type: ignore[attr-defined]
        except pydantic.ValidationError as exc:
            errors.extend(pydantic_errors(exc, doc, models_at(section.model, (name,)), prefix=(name,)))
            if section.default:  # the other checks still run, on the defaults, so one pass shows every problem
                out[name] = section.model()  # type: ignore[call-arg]
    return out


def _validate_by_plugins(item: SpecItem, ctx: LoadContext) -> list[SpecError]:
    """Every plugin fills the item first (resolve), then every plugin checks it (validate)."""
    errors = []
    hook = ctx.config.hook
    for results in [*hook.sft_spec_resolve_spec(item=item, config=ctx.config),
                    *hook.sft_spec_validate_spec(item=item, config=ctx.config)]:
        for problem in results or []:
            errors.append(problem if isinstance(problem, SpecError) else SpecError(str(problem), item.location))
    return errors


def _without_broken_keys(data: dict, exc: pydantic.ValidationError) -> Spec | None:
    """The spec without the top-level keys the schema does not know (a misspelled key), so the other keys
    are still checked and one run lists every independent error, as a compiler does. None when a known key
    is broken: checking the rest against its default (``method: qlor`` read as ``full``) would report
    errors the user never wrote."""
    errors = exc.errors()
    if any(err["type"] != "extra_forbidden" or len(err["loc"]) != 1 for err in errors):
        return None
    unknown = {err["loc"][0] for err in errors}
    try:
        return Spec.model_validate({k: v for k, v in data.items() if k not in unknown})
    except pydantic.ValidationError:
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
        errors += pydantic_errors(exc, doc, also_known=list(ctx.config.registry.sections))
        spec = _without_broken_keys(data, exc)
        if spec is None:  # a required key is broken: nothing sound to check the rest against
            raise SpecErrors(errors) from None
    spec.name = name
    item = SpecItem(nodeid=nodeid, path=path, name=name, variant=variant, spec=spec, conversations=[],
                    expectations=[], training_checks=[], location=doc.locate(()), doc=doc, sections=sections)
    item.expectations = build_expectations(spec, nodeid, doc, ctx, errors)
    item.training_checks = build_training_checks(spec, nodeid, doc, ctx, errors)
    # Plugins fill the item from what the spec names (conversations from data:, the chat template, eval
    # sets), then check what they own (names of formatters, collators and model loaders, TRL's fields).
    errors += _validate_by_plugins(item, ctx)
    if not item.expectations and not item.training_checks and not errors:
        # A spec that checks nothing passes whatever training did: almost always a forgotten section.
        where = doc.locate(("expect",)) if "expect" in doc.data else doc.locate(())
        errors.append(SpecError("nothing to check: add expect (prompts with equals, contains, regex, ...) or "
                                "checks (e.g. loss_decreased: true)", where,
                                key="expect" if "expect" in doc.data else None))
    if errors:  # the spec file's first, in its order, then each data file's, as a compiler lists them
        def order(error: SpecError) -> tuple:
            where = error.location
            if where is None:
                return (0, "", 0, 0)
            return (str(where.path) != str(doc.path), str(where.path), where.line, where.column)

        raise SpecErrors(sorted(errors, key=order))
    return item
