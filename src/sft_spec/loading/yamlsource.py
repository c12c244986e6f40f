"""YAML loading that remembers where every value came from.

Specs come from pull requests, so this uses PyYAML's safe loader only (no object construction), refuses
duplicate keys, and stops alias bombs. Every key path maps to its ``file:line:column`` so that
validation errors point at the offending line, like a compiler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import Location, SpecError

KeyPath = tuple[str | int, ...]

#: Nodes one document may expand to; aliases make "billion laughs" documents explode past this.
MAX_NODES = 100_000
#: Nesting depth one document may reach; PyYAML composes recursively, so deeper input would crash it.
MAX_DEPTH = 64
#: A spec file is a short recipe; anything larger is refused before parsing.
MAX_SPEC_BYTES = 4 * 1024 * 1024

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _SpecResolver(yaml.resolver.Resolver):
    """Also reads ``2e-5`` as a float: YAML 1.1 wants ``2.0e-5``, and learning rates are rarely written so."""


_SpecResolver.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


class _DepthLimitedComposer(yaml.composer.Composer):
    _depth = 0

    def compose_node(self, parent, index):
        # The composer recurses once per level: stop at a located error long before RecursionError.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _SpecLoader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, _DepthLimitedComposer,
                  yaml.constructor.SafeConstructor, _SpecResolver):
    """The pure-Python safe loader: slower, with PyYAML's most precise error messages."""

    def __init__(self, stream):
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        _DepthLimitedComposer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        _SpecResolver.__init__(self)


try:
    from yaml._yaml import CParser
except ImportError:  # PyYAML built without libyaml
    _FastSpecLoader = None
else:

    class _FastSpecLoader(_DepthLimitedComposer, yaml.constructor.SafeConstructor, _SpecResolver, CParser):
        """libyaml scans and parses (8x faster, which keeps ``validate`` on hundreds of specs instant);
        composing stays in Python, so the depth limit and safe construction are the same."""

        def __init__(self, stream):
            CParser.__init__(self, stream)
            _DepthLimitedComposer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            _SpecResolver.__init__(self)


@dataclass
class LocatedDocument:
    """Plain data (dicts, lists, scalars) plus where each key path was written."""

    data: Any
    locations: dict[KeyPath, Location]
    path: str

    def locate(self, keypath: KeyPath) -> Location:
        """The location of ``keypath``, or of its nearest located parent."""
        for end in range(len(keypath), -1, -1):
            loc = self.locations.get(tuple(keypath[:end]))
            if loc is not None:
                return loc
        return Location(self.path)


def _loc(path: str, mark: yaml.Mark | None) -> Location:
    return Location(path, 1, 1) if mark is None else Location(path, mark.line + 1, mark.column + 1)


def _offset_loc(path: str, text: str, offset: int) -> Location:
    """The line and column of a character offset (PyYAML's reader errors carry only the offset)."""
    before = text[:offset]
    return Location(path, before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1)


def _tag_error(tag: str, mark: yaml.Mark | None, path: str) -> SpecError:
    shown = tag.replace("tag:yaml.org,2002:", "!!")
    return SpecError(f"YAML tag {shown!r} is not allowed: a spec is plain data (mappings, lists, strings, "
                     "numbers, booleans); tags that build Python objects are never run", _loc(path, mark))


def parse_yaml(text: str, path: str) -> LocatedDocument:
    """Parse one YAML document; raise :class:`SpecError` with the location of any problem."""
    loader = None
    try:
        try:
            # libyaml is laxer about control characters than PyYAML's reader: let the reader refuse those.
            if _FastSpecLoader is not None and not yaml.reader.Reader.NON_PRINTABLE.search(text):
                try:
                    loader = _FastSpecLoader(text)
                    node = loader.get_single_node()
                except yaml.YAMLError:
                    loader = None  # parse again in Python below, for PyYAML's exact message and location
            if loader is None:
                loader = _SpecLoader(text)  # the reader checks for unprintable characters right here
                node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            raise _syntax_error(exc, path) from None
        except yaml.reader.ReaderError as exc:
            char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
            raise SpecError(f"invalid YAML: character {char} is not allowed in a YAML file",
                            _offset_loc(path, text, exc.position)) from None
        except yaml.YAMLError as exc:
            raise SpecError(f"invalid YAML: {exc}", Location(path, 1, 1)) from None
        locations: dict[KeyPath, Location] = {}
        if node is None:
            return LocatedDocument(None, locations, path)
        return LocatedDocument(_convert(loader, node, (), locations, path, [MAX_NODES]), locations, path)
    finally:
        if loader is not None:
            loader.dispose()


def _syntax_error(exc: yaml.MarkedYAMLError, path: str) -> SpecError:
    """PyYAML's problem, located where it was found; its context (``while scanning a quoted scalar``)
    names where the broken construct began, which is where the fix usually goes."""
    mark = exc.problem_mark or exc.context_mark
    if exc.problem and exc.problem.startswith("could not determine a constructor for the tag"):
        tag = exc.problem.rsplit("for the tag ", 1)[-1].strip("'")
        return _tag_error(tag, mark, path)
    problem = exc.problem or exc.context or "invalid YAML"
    if "'\\t'" in problem:
        problem += " (YAML does not allow tabs for indentation)"
    if exc.context and exc.problem and exc.problem.startswith("but "):
        problem = f"{exc.context}, {exc.problem}"
    elif exc.context and exc.problem and exc.context_mark is not None and exc.context_mark is not mark:
        where = exc.context_mark
        problem += f" ({exc.context} started at {where.line + 1}:{where.column + 1})"
    return SpecError(f"invalid YAML: {problem}", _loc(path, mark))


def load_yaml_file(path: Path, display_path: str | None = None) -> LocatedDocument:
    shown = display_path or str(path)
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"the file is {size // 1024} KiB; a spec file may hold at most "
                            f"{MAX_SPEC_BYTES // 1024} KiB (put training data in data.files)",
                            Location(shown, 1, 1))
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read file: {exc.strerror}", Location(shown)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = raw.rfind(b"\n", 0, exc.start) + 1
        line = raw[: exc.start].count(b"\n") + 1
        column = len(raw[start: exc.start].decode("utf-8", "replace")) + 1
        raise SpecError(f"file is not valid UTF-8 (byte 0x{raw[exc.start]:02x})",
                        Location(shown, line, column)) from None
    return parse_yaml(text, shown)


def _convert(loader, node, keypath: KeyPath, locations, path: str, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise SpecError(f"YAML document expands to more than {MAX_NODES} values (an alias bomb?)",
                        _loc(path, node.start_mark))
    locations.setdefault(keypath, _loc(path, node.start_mark))
    if isinstance(node, yaml.MappingNode):
        if node.tag != _MAP_TAG:
            raise _tag_error(node.tag, node.start_mark, path)
        result: dict[Any, Any] = {}
        explicit: dict[Any, yaml.Mark] = {}
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
                first = explicit[key]
                raise SpecError(f"duplicate key {key!r} (first at line {first.line + 1}); a key may appear once",
                                _loc(path, key_node.start_mark))
            explicit[key] = key_node.start_mark
            locations[keypath + (key,)] = _loc(path, key_node.start_mark)
            result[key] = _convert(loader, value_node, keypath + (key,), locations, path, budget)
        return result
    if isinstance(node, yaml.SequenceNode):
        if node.tag != _SEQ_TAG:
            raise _tag_error(node.tag, node.start_mark, path)
        return [_convert(loader, item, keypath + (i,), locations, path, budget)
                for i, item in enumerate(node.value)]
    try:
        return loader.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as exc:
        raise _syntax_error(exc, path) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts, a bad date
        raise SpecError(f"invalid value: {exc}", _loc(path, node.start_mark)) from None

