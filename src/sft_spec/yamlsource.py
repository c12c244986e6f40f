"""YAML loading that remembers where every value came from.

Specs come from pull requests, so this uses PyYAML's safe loader only (no object construction), refuses
duplicate keys, and stops alias bombs. Every key path maps to its ``file:line:column`` so that
validation errors point at the offending line, like a compiler.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import Location, SpecError

KeyPath = tuple[str | int, ...]

#: Nodes one document may expand to; aliases make "billion laughs" documents explode past this.
MAX_NODES = 100_000

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``2e-5`` as a float.

    YAML 1.1 wants a dot (``2.0e-5``); learning rates are written without one so often that reading
    them as strings would surprise every user.
    """


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class LocatedDocument:
    """Plain data (dicts, lists, scalars) plus where each key path was written."""

    def __init__(self, data: Any, locations: dict[KeyPath, Location], path: str):
        self.data = data
        self.locations = locations
        self.path = path

    def locate(self, keypath: KeyPath) -> Location:
        """The location of ``keypath``, or of its nearest located parent."""
        for end in range(len(keypath), -1, -1):
            loc = self.locations.get(tuple(keypath[:end]))
            if loc is not None:
                return loc
        return Location(self.path)


def _loc(path: str, mark: yaml.Mark | None) -> Location:
    if mark is None:
        return Location(path)
    return Location(path, mark.line + 1, mark.column + 1)


def parse_yaml(text: str, path: str) -> LocatedDocument:
    """Parse one YAML document; raise :class:`SpecError` with the location of any problem."""
    loader = _SpecLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = exc.problem or exc.context or "invalid YAML"
            if "\t" in problem or "'\\t'" in problem:
                problem += " (YAML does not allow tabs for indentation)"
            raise SpecError(f"invalid YAML: {problem}", _loc(path, mark)) from None
        except yaml.YAMLError as exc:
            raise SpecError(f"invalid YAML: {exc}", Location(path)) from None
        locations: dict[KeyPath, Location] = {}
        if node is None:
            return LocatedDocument(None, locations, path)
        budget = [MAX_NODES]
        data = _convert(loader, node, (), locations, path, budget)
        return LocatedDocument(data, locations, path)
    finally:
        loader.dispose()


def load_yaml_file(path: Path, display_path: str | None = None) -> LocatedDocument:
    shown = display_path or str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read file: {exc.strerror}", Location(shown)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError("file is not valid UTF-8", Location(shown, line)) from None
    return parse_yaml(text, shown)


def _convert(loader, node, keypath: KeyPath, locations, path: str, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise SpecError(
            f"YAML document expands to more than {MAX_NODES} values (an alias bomb?)",
            _loc(path, node.start_mark),
        )
    locations.setdefault(keypath, _loc(path, node.start_mark))
    if isinstance(node, yaml.MappingNode):
        if node.tag != _MAP_TAG:
            raise SpecError(f"tag {node.tag!r} is not allowed here", _loc(path, node.start_mark))
        result: dict[Any, Any] = {}
        explicit: set[Any] = set()
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged = _convert(loader, value_node, keypath, {}, path, budget)
                for item in merged if isinstance(merged, list) else [merged]:
                    if not isinstance(item, dict):
                        raise SpecError("'<<' merges only mappings", _loc(path, value_node.start_mark))
                    for k, v in item.items():
                        result.setdefault(k, v)
                continue
            key = _convert(loader, key_node, keypath + ("<key>",), {}, path, budget)
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise SpecError("mapping keys must be plain scalars", _loc(path, key_node.start_mark))
            if key in explicit:
                raise SpecError(f"duplicate key {key!r}", _loc(path, key_node.start_mark))
            explicit.add(key)
            locations[keypath + (key,)] = _loc(path, key_node.start_mark)
            result[key] = _convert(loader, value_node, keypath + (key,), locations, path, budget)
        return result
    if isinstance(node, yaml.SequenceNode):
        if node.tag != _SEQ_TAG:
            raise SpecError(f"tag {node.tag!r} is not allowed here", _loc(path, node.start_mark))
        return [
            _convert(loader, item, keypath + (i,), locations, path, budget) for i, item in enumerate(node.value)
        ]
    try:
        return loader.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as exc:
        raise SpecError(f"invalid YAML: {exc.problem}", _loc(path, exc.problem_mark)) from None

