"""``matrix:``: one variant per entry, each entry deep-merged over the spec; errors name their entry."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import Location, SpecError, SpecErrors
from .merge import merge_docs
from .wording import kind_of
from .yamlsource import LocatedDocument


@dataclass
class Variant:
    id: str | None
    doc: LocatedDocument
    index: int = -1
    #: Where this matrix entry's own keys were written: errors there are named ``matrix[i].key``.
    written: frozenset[Location] = frozenset()


def tag_variant(errors: list[SpecError], variant: Variant, count: int) -> list[SpecError]:
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


def dedupe(errors: list[SpecError]) -> list[SpecError]:
    """Matrix entries repeat the base spec's problems: report each location and message once."""
    seen, out = set(), []
    for e in errors:
        base = re.sub(r" \(matrix entry '[^']*'\)$", "", e.message)
        key = (str(e.location), e.key, base)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def expand_matrix(doc: LocatedDocument) -> list[Variant]:
    matrix = doc.data.get("matrix")
    if matrix is None or matrix == []:
        return [Variant(None, doc)]
    if not isinstance(matrix, list):
        raise SpecError(f"expected a list of entries, got {kind_of(matrix)}", doc.locate(("matrix",)),
                        key="matrix")
    base = LocatedDocument({k: v for k, v in doc.data.items() if k != "matrix"}, doc.locations, doc.path)
    seen: dict[str, int] = {}
    out, errors = [], []
    for i, entry in enumerate(matrix):
        where = doc.locate(("matrix", i))
        if not isinstance(entry, dict):
            errors.append(SpecError(f"a matrix entry is a mapping with an id, not a {kind_of(entry)}", where,
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
        out.append(Variant(entry_id, merge_docs(base, LocatedDocument(over_data, over_locs, doc.path)), i,
                            frozenset(over_locs.values())))
    if errors:
        raise SpecErrors(errors)
    return out
