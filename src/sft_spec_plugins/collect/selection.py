"""``-k`` and ``-m``: select test cases by id and specs by tag, with pytest's grammar (``and``, ``or``,
``not``, parentheses).

``-k`` names match as case-insensitive substrings of a test id (expectations and training checks
alike); ``-m`` names match tags exactly. A spec none of whose cases is selected is deselected.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from sft_spec import hookimpl
from sft_spec.errors import UsageError
from sft_spec.state import StashKey

_TOKEN = re.compile(r"\s*(\(|\)|[^\s()]+)")


class Expression:
    def __init__(self, source: str):
        self.source = source
        self.tokens = [m.group(1) for m in _TOKEN.finditer(source)]
        if not self.tokens:
            raise UsageError(f"empty expression: {source!r}")
        self.pos = 0
        self.tree = self._or()
        if self.pos != len(self.tokens):
            raise UsageError(f"wrong expression {source!r}: unexpected {self.tokens[self.pos]!r}")

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise UsageError(f"wrong expression {self.source!r}: unexpected end")
        self.pos += 1
        return token

    def _or(self):
        node = self._and()
        while self._peek() == "or":
            self._take()
            node = ("or", node, self._and())
        return node

    def _and(self):
        node = self._not()
        while self._peek() == "and":
            self._take()
            node = ("and", node, self._not())
        return node

    def _not(self):
        if self._peek() == "not":
            self._take()
            return ("not", self._not())
        token = self._take()
        if token == "(":
            node = self._or()
            if self._take() != ")":
                raise UsageError(f"wrong expression {self.source!r}: missing ')'")
            return node
        if token in (")", "and", "or"):
            raise UsageError(f"wrong expression {self.source!r}: unexpected {token!r}")
        return ("name", token)

    def evaluate(self, matcher: Callable[[str], bool]) -> bool:
        def run(node) -> bool:
            kind = node[0]
            if kind == "name":
                return matcher(node[1])
            if kind == "not":
                return not run(node[1])
            if kind == "and":
                return run(node[1]) and run(node[2])
            return run(node[1]) or run(node[2])

        return run(self.tree)


def keyword_matcher(nodeid: str, tags: list[str]) -> Callable[[str], bool]:
    haystack = [nodeid.lower()] + [t.lower() for t in tags]
    return lambda name: any(name.lower() in h for h in haystack)


def tag_matcher(tags: list[str]) -> Callable[[str], bool]:
    return lambda name: name in tags


@hookimpl
def sft_spec_addoption(parser) -> None:
    parser.add_argument("--shard", metavar="I/N", default=None,
                        help="run the I-th of N deterministic slices of the selected specs (1-based), for "
                        "CI matrix jobs, Kubernetes Indexed Jobs or Slurm arrays; merge with sft-spec report --merge")


def parse_shard(value: str) -> tuple[int, int]:
    from sft_spec.errors import UsageError

    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise UsageError(f"--shard {value!r}: expected I/N, e.g. 1/4") from None
    if not 1 <= index <= count:
        raise UsageError(f"--shard {value!r}: I must be from 1 to N")
    return index, count


def shard(items: list, index: int, count: int) -> list:
    """Every count-th spec in node-id order, starting at the index-th: the same slices on every machine,
    whatever order the files were found in, and balanced to within one spec."""
    ordered = sorted(items, key=lambda item: item.nodeid)
    return [item for position, item in enumerate(ordered) if position % count == index - 1]


#: This run's --shard slice, for the results document: ``index``, ``count``, ``specs`` (every selected spec's
#: id before slicing, in collection order: what ``report --merge`` orders by and checks for missing shards)
#: and ``sliced_out`` (the specs left to the other shards, not deselected by -k or -m).
SHARD = StashKey[dict]()


@hookimpl(trylast=True)
def sft_spec_collection_modifyitems(session, items) -> None:
    keyword = session.config.getoption("keyword")
    markexpr = session.config.getoption("markexpr")
    _select(session, items, keyword, markexpr)
    sharding = session.config.getoption("shard", None)
    if sharding:  # after -k and -m: the slices are of what is selected
        index, count = parse_shard(sharding)
        kept = {id(item) for item in shard(items, index, count)}
        session.config.stash[SHARD] = {"index": index, "count": count, "specs": [item.nodeid for item in items],
                                       "sliced_out": len(items) - len(kept)}
        session.deselected += len(items) - len(kept)
        if items and not kept:  # more shards than specs: this job has nothing to do, and that is no failure
            session.empty_ok = (f"--shard {index}/{count}: no spec falls in this slice ({len(items)} specs, "
                                f"{count} shards)")
        items[:] = [item for item in items if id(item) in kept]  # collection order kept


@hookimpl
def sft_spec_terminal_summary(session, write_line) -> None:
    if session.empty_ok:
        write_line(session.empty_ok)


def _select(session, items, keyword, markexpr) -> None:
    if not keyword and not markexpr:
        return
    kexpr = Expression(keyword) if keyword else None
    mexpr = Expression(markexpr) if markexpr else None
    kept = []
    for item in items:
        if mexpr and not mexpr.evaluate(tag_matcher(item.tags)):
            session.deselected += 1
            continue
        if kexpr:
            for case in item.cases:
                case.selected = kexpr.evaluate(keyword_matcher(case.nodeid, item.tags))
            if not item.selected_cases:
                session.deselected += 1
                continue
        kept.append(item)
    items[:] = kept
