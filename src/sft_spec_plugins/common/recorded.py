"""Files recorded beside a spec (``__snapshots__/``, ``__baselines__/``) and report-time check results.

Snapshots and loss baselines are reviewable YAML next to the spec file they belong to, keyed by the
test id without its file part (``regression[lora]::expect[0]``), so a key does not depend on the folder
``sft-spec`` was started from.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from sft_spec.loading import spec_stem

from .files import OutsideWrite, atomic_write_text, check_written

#: Libraries whose versions decide a training result (recorded in baselines and result-cache keys).
LIBRARIES = ("torch", "transformers", "trl", "peft")


def optional_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"


def library_versions() -> dict[str, str]:
    return {name: optional_version(name) for name in LIBRARIES}


def short_id(nodeid: str) -> str:
    """``specs/x.sft.yaml::x[lora]::expect[0]`` -> ``x[lora]::expect[0]``: the file is the YAML file's name."""
    return nodeid.split("::", 1)[1] if "::" in nodeid else nodeid


def content_hash(path: Path) -> str | None:
    """A file's contents as a hash, for a cache key; None when it cannot be read (missing: another key)."""
    try:
        return sha256(Path(path).read_bytes())
    except OSError:
        return None


def recorded_hash(spec_path: Path, folder: str) -> str | None:
    """A spec's snapshot or baseline file, as a cache key holds it; one linked out of the spec's folder
    (or to a device) is not read."""
    path = recorded_path(spec_path, folder)
    try:
        check_written(path, path.parent.parent)
    except OSError:
        return "outside"
    return content_hash(path) if path.is_file() else None


def recorded_path(spec_path: Path, folder: str) -> Path:
    """``x.sft.yaml`` -> ``folder/x.yaml``, ``x.sft.yml`` -> ``folder/x.yml``: one file per spec file (two spec
    files with the same stem do not share one), and never a spec file name, so never collected as one."""
    spec_path = Path(spec_path).resolve()
    return spec_path.parent / folder / (spec_stem(spec_path) + spec_path.suffix)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: ``{"training": {"seed": 1}}`` -> ``{"training.seed": 1}``."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def sha256(data: Any) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data, sort_keys=True, ensure_ascii=False,
                                                          default=str).encode("utf-8")
    return hashlib.sha256(raw).hexdigest()


class RecordedFile:
    """One ``__snapshots__``/``__baselines__`` file: read once, rewritten atomically when changed."""

    def __init__(self, path: Path, header: str):
        self.path = path
        self.header = header
        self.entries: dict[str, Any] = {}
        self.error = ""
        try:  # the spec's folder: a committed symlink (__snapshots__ -> ~/.ssh) is neither read nor written
            check_written(path, path.parent.parent)
        except OutsideWrite as exc:
            self.error = str(exc)
            return
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
                if not isinstance(data, dict):
                    raise ValueError(f"expected a mapping of test ids, got {type(data).__name__}")
                self.entries = {str(k): v for k, v in data.items()}
            except (OSError, ValueError, yaml.YAMLError) as exc:
                self.error = f"cannot read {path}: {exc}"
        self.changed = False

    def set(self, key: str, value: Any) -> None:
        if self.entries.get(key) != value:
            self.entries[key] = value
            self.changed = True

    def remove(self, key: str) -> None:
        if key in self.entries:
            del self.entries[key]
            self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        check_written(self.path, self.path.parent.parent)
        body = yaml.safe_dump(dict(sorted(self.entries.items())), allow_unicode=True, sort_keys=False,
                              default_flow_style=False, width=100)
        atomic_write_text(self.path, self.header + body)
        self.changed = False

def code_and_versions() -> dict[str, Any]:
    """What anything cached depends on besides its own inputs: sft-spec's code, the training libraries'
    versions and Python's (a result in the result cache, a base answer)."""
    return {"versions": {**library_versions(), "bitsandbytes": optional_version("bitsandbytes")},
            "python": sys.version.split()[0], "code": code_hash()}


@functools.lru_cache(maxsize=1)  # every file of the two packages, read once a process: it is asked per spec
def code_hash() -> str:
    """The source of sft-spec and its built-in plugins: editing either invalidates every result."""
    import sft_spec
    import sft_spec_plugins

    parts = []
    for package in (sft_spec, sft_spec_plugins):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            parts.append([str(path.relative_to(root)), sha256(path.read_bytes())])
    return sha256(parts)
