"""The run's configuration: parsed options, the plugin manager, the registry, folders, plugin state; and
where sft-spec keeps files (the cache folder, the project root that bounds defaults lookup)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pluggy

from .errors import UsageError
from .registry import Registry
from .state import Stash

_NOTSET: Any = object()


@dataclass
class Config:
    options: argparse.Namespace
    pluginmanager: pluggy.PluginManager
    registry: Registry
    rootdir: Path
    cache_dir: Path
    output_dir: Path
    invocation_args: list[str] = field(default_factory=list)
    #: "main" prints and writes reports; a "worker" (``-n``, a launcher, a cluster) only runs specs.
    role: Literal["main", "worker"] = "main"
    #: Per-plugin state under typed keys (pytest's stash).
    stash: Stash = field(default_factory=Stash)

    @property
    def hook(self):
        return self.pluginmanager.hook

    def getoption(self, name: str, default: Any = _NOTSET) -> Any:
        """The option's value, as pytest's: an unknown name raises unless a default is given (a plugin that
        reads another's option passes one, so disabling that plugin does not break it)."""
        if not hasattr(self.options, name):
            if default is _NOTSET:
                raise ValueError(f"no option named {name!r}")
            return default
        value = getattr(self.options, name)
        return default if value is None and default not in (None, _NOTSET) else value


def find_pyproject(start: Path) -> Path | None:
    start = start.resolve()
    return next((d / "pyproject.toml" for d in [start, *start.parents] if (d / "pyproject.toml").is_file()), None)


def pyproject_defaults(start: Path) -> tuple[list[str], Path | None]:
    """``[tool.sft-spec] addopts`` from the nearest pyproject.toml: command-line defaults for the project."""
    path = find_pyproject(start)
    if path is None:
        return [], None
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read [tool.sft-spec]: {exc}") from None
    section = data.get("tool", {}).get("sft-spec", {})
    if not isinstance(section, dict):
        raise UsageError(f"{path}: [tool.sft-spec] must be a table")
    unknown = set(section) - {"addopts"}
    if unknown:
        raise UsageError(f"{path}: unknown key(s) in [tool.sft-spec]: {', '.join(sorted(unknown))} (known: addopts)")
    addopts = section.get("addopts", [])
    if isinstance(addopts, str):
        addopts = shlex.split(addopts)
    return [str(a) for a in addopts], path


#: Files and folders that mark a project's root, as pytest's rootdir and conftest lookup know it.
PROJECT_MARKERS = ("pyproject.toml", ".git", "setup.cfg", "tox.ini", "pytest.ini")


def project_root(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` holding a project marker (pyproject.toml, .git, ...)."""
    start = Path(start).resolve()
    for directory in [start, *start.parents]:
        if any((directory / marker).exists() for marker in PROJECT_MARKERS):
            return directory
    return None


def default_cache_dir() -> Path:
    """``$SFT_SPEC_CACHE``, else ``$XDG_CACHE_HOME/sft-spec``, else ``~/.cache/sft-spec``."""
    env = os.environ.get("SFT_SPEC_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sft-spec"
