"""From a ``*.sft.yaml`` file to spec items, or to every error in it, each naming ``file:line:column``.

One room per job: ``yamlsource`` (safe, located YAML), ``merge`` (``sft-defaults.yaml``), ``matrix``,
``build`` (one item: schema, plugins' keys and checks), ``wording`` (pydantic's errors in the format's
words), ``expectations`` (test cases), ``data`` (what a conversation is), ``paths`` (the one path rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import Location, SpecError, SpecErrors, nodeid_path, relpath
from ..state import SpecItem
from .build import build_item
from .matrix import dedupe, expand_matrix, tag_variant
from .merge import DEFAULTS_NAME, defaults_chain, merge_docs
from .paths import check_inside
from .wording import kind_of
from .yamlsource import LocatedDocument, load_yaml_file

if TYPE_CHECKING:
    from ..config import Config

SPEC_SUFFIXES = (".sft.yaml", ".sft.yml")
__all__ = ["DEFAULTS_NAME", "SPEC_SUFFIXES", "LoadContext", "is_spec_file", "load_spec_file", "load_yaml_file",
           "spec_stem"]


def is_spec_file(path: Path) -> bool:
    return path.name.endswith(SPEC_SUFFIXES)


def spec_stem(path: Path) -> str:
    for suffix in SPEC_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


@dataclass
class LoadContext:
    """What loading needs from the run: its config (registry, hooks); defaults files read once."""

    config: Config
    defaults: dict[Path, LocatedDocument | None] = field(default_factory=dict)


def load_spec_file(path: Path, ctx: LoadContext) -> list[SpecItem]:
    """Load one spec file into items; raise :class:`SpecErrors` with every problem found."""
    shown = relpath(path)
    try:  # a spec file linked from outside its folder would make that folder "the spec's own"
        check_inside(path.parent, path.name, "spec file")
    except ValueError as exc:
        raise SpecError(str(exc), Location(shown, 1, 1)) from None
    doc = load_yaml_file(path, shown)
    if doc.data is None:
        raise SpecError("the spec file is empty: it needs at least model, data and expect",
                        Location(shown, 1, 1))
    if not isinstance(doc.data, dict):
        raise SpecError(
            f"a spec file holds a mapping of keys (name, model, data, expect, ...), not a {kind_of(doc.data)}",
            doc.locate(()),
        )
    for defaults in reversed(defaults_chain(path, ctx.defaults, ctx.config.getoption("rootdir", None))):
        doc = merge_docs(defaults, doc)
    # The spec file's own path is what items are named after, whatever the defaults said.
    doc.path = shown
    name = doc.data.get("name") or spec_stem(path)
    if not isinstance(name, str):
        raise SpecError("expected a string", doc.locate(("name",)), key="name")

    variants = expand_matrix(doc)
    items: list[SpecItem] = []
    errors: list[SpecError] = []
    for variant in variants:
        nodeid = f"{nodeid_path(path, ctx.config.rootdir)}::{name}" + (f"[{variant.id}]" if variant.id else "")
        try:
            items.append(build_item(path, nodeid, name, variant.id, variant.doc, ctx))
        except SpecErrors as exc:
            errors.extend(tag_variant(exc.errors, variant, len(variants)))
        except SpecError as exc:
            errors.extend(tag_variant([exc], variant, len(variants)))
    if errors:
        raise SpecErrors(dedupe(errors), items)
    return items
