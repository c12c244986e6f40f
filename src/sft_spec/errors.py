"""Errors as values with a location, so a broken spec is reported like a compiler error."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Location:
    """A place in a file; ``line`` and ``column`` are 1-based, 0 when unknown."""

    path: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        return self.path + (f":{self.line}" if self.line else "") + (f":{self.column}" if self.line and self.column
                                                                       else "")


class SpecError(Exception):
    """A problem with one spec (or its data): reported for that spec, the others still run."""

    def __init__(self, message: str, location: Location | None = None, key: str | None = None):
        super().__init__(message)
        self.message, self.location, self.key = message, location, key

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location else ""
        key = f"{self.key}: " if self.key else ""
        return f"{where}{key}{self.message}"


class SpecErrors(SpecError):
    """Several problems found in one spec file at once, so the user fixes them in one pass."""

    def __init__(self, errors: list[SpecError], items: list | None = None):
        self.errors, self.items = errors, items or []  # items: the file's matrix entries that did load
        super().__init__(errors[0].message, errors[0].location, errors[0].key)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


@dataclass(frozen=True)
class PluginProblem:
    """A plugin that could not be imported or registered: reported as an error, the run goes on."""

    name: str
    message: str


class UsageError(Exception):
    """Bad command line or missing path: exit code 4, like pytest."""


class SpecTimeout(BaseException):
    """A spec ran longer than ``--timeout``: that spec is an error, the run goes on. A BaseException, as
    pytest's outcomes are: an ``except Exception`` in a library's training loop once swallowed it."""


class SkipSpec(Exception):
    """Raised by a plugin to skip a spec with a reason (e.g. 4-bit needs a backend this machine lacks)."""


def did_you_mean(name: str, choices: list[str] | tuple[str, ...] | set[str], what: str) -> str:
    """``Unknown collator 'completion'. Did you mean: completion_only? Available: ...``"""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    message = f"unknown {what} {name!r}."
    if close:
        message += f" Did you mean: {', '.join(close)}?"
    if len(choices) <= 20:  # short lists (a spec's top-level keys) are worth printing in full
        message += f" Available: {', '.join(choices)}"
    return message


def nodeid_path(path: Path | str, rootdir: Path | None) -> str:
    """A spec file as test ids name it: relative to the suite's root, as pytest's node ids are, so two
    checkouts of one project (``main/specs``, ``pr/specs``) name their specs alike; outside the root, as
    :func:`relpath` shows it."""
    if rootdir is not None:
        try:
            return Path(path).resolve().relative_to(Path(rootdir).resolve()).as_posix()
        except ValueError:
            pass
    return relpath(path)


def relpath(path: Path | str) -> str:
    """A path as the user would type it: relative to the working directory when below it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)
