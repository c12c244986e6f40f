"""``sft-defaults.yaml`` files merged under a spec, matrix entries over it; every merge makes fresh
containers, so what one spec's loading does to its own copy cannot leak into the cached defaults or a
sibling matrix entry."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ..config import project_root
from ..errors import SpecError, relpath
from .paths import check_inside
from .yamlsource import LocatedDocument, load_yaml_file

DEFAULTS_NAME = "sft-defaults.yaml"


def deep_merge(base: Any, over: Any) -> Any:
    """Mappings merge key by key; anything else in ``over`` replaces ``base`` (lists included). Deep copies."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = {key: copy.deepcopy(value) for key, value in base.items() if key not in over}
        for key, value in over.items():
            out[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(over)


def merge_docs(base: LocatedDocument, over: LocatedDocument) -> LocatedDocument:
    locations = dict(base.locations)
    locations.update(over.locations)
    return LocatedDocument(deep_merge(base.data, over.data), locations, over.path)


def defaults_chain(spec_path: Path, memo: dict[Path, LocatedDocument | None],
                   stop: Path | None = None) -> list[LocatedDocument]:
    """``sft-defaults.yaml`` files from the project root down to the spec's folder (nearer ones merge last).

    The project root is the nearest folder above the spec with pyproject.toml, .git, ...; ``stop``
    (``--rootdir``) may end the walk lower. So the same files apply whatever path the run was started
    with, and under pytest too, as pytest finds conftest files. Outside a project only the spec's own
    folder counts (a stray /tmp/sft-defaults.yaml never applies). A defaults file that is a symlink out
    of its folder is an error.
    """
    found = []
    directory = spec_path.resolve().parent
    root = project_root(directory) or directory
    if stop is not None and (stop := stop.resolve()) != root and root in stop.parents and (
            stop == directory or stop in directory.parents):
        root = stop
    while True:
        if directory not in memo:
            memo[directory] = _read_defaults(directory / DEFAULTS_NAME)
        if memo[directory] is not None:
            found.append(memo[directory])
        if directory == root:
            break
        directory = directory.parent
    return list(reversed(found))


def _read_defaults(candidate: Path) -> LocatedDocument | None:
    if not candidate.is_file():
        return None
    shown = relpath(candidate)
    try:
        check_inside(candidate.parent, DEFAULTS_NAME, what="sft-defaults.yaml")
    except ValueError as exc:
        raise SpecError(str(exc), LocatedDocument(None, {}, shown).locate(())) from None
    doc = load_yaml_file(candidate, shown)
    if doc.data is None:
        return None
    if not isinstance(doc.data, dict):
        raise SpecError("sft-defaults.yaml must hold a mapping of spec keys", doc.locate(()))
    return doc
