"""Files plugins write: atomically (a run killed at any moment leaves the old file or the new one,
never half), model folders built beside their final place, and each spec's own output folder."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sft_spec.loading.paths import check_inside


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode any new file would get.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def building_directory(final: Path) -> Iterator[Path]:
    """A temporary folder beside ``final`` to build into; published with one rename when the block ends.

    A killed build never leaves half a directory; if a concurrent build finished first, its directory
    is kept. Files are made readable to all, since caches are shared (mkdtemp makes them private).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        for path in (tmp, *tmp.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            os.rename(tmp, final)  # rename, not replace: it fails when a concurrent build already won
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def spec_output_dir(config, item, sub: str = "") -> Path:
    """The spec's own folder under the run's output folder: a readable, file-safe start of its id and a
    hash of the whole id (a file name holds 255 bytes, a spec name can be longer; two ids never share).
    ``sub``: a folder inside it. A link placed at either name (both are predictable) may not lead out of the
    output folder."""
    readable = re.sub(r"[^\w.\-\[\]]+", "_", item.nodeid, flags=re.ASCII).strip("._")[-60:]
    folder = Path(config.output_dir) / f"{readable}-{hashlib.sha256(item.nodeid.encode()).hexdigest()[:12]}"
    return check_written(folder / sub if sub else folder, Path(config.output_dir))


class OutsideWrite(PermissionError):
    """A write (or a read of a file sft-spec itself writes) that a symlink would take out of its folder."""


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_written(path: Path, *roots: Path) -> Path:
    """The rule for every place sft-spec writes into (``__snapshots__``, ``__baselines__``, ``.sft-spec``, a
    spec's output folder, a report or folder named on the command line), as ``check_inside`` is for the files
    a spec reads: no symlink that lies inside one of ``roots`` may lead the path out of it, so a committed
    link (``__snapshots__ -> ~/.ssh``) never redirects a write, nor a read of what was written. The path is
    followed as the operating system follows it (a link, then ``..`` from where it led); a path that leaves
    a root without a link (absolute, or climbing with ``..``) is the user's own choice. An OSError, so that
    a reporter says why a file was not written instead of crashing."""
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    given = Path(path)
    current = Path(os.path.realpath(Path.cwd() if not given.is_absolute() else given.anchor))
    for part in given.parts[1:] if given.is_absolute() else given.parts:
        if part in ("", "."):
            continue
        if part == "..":
            current = current.parent
            continue
        step = current / part
        if step.is_symlink():
            target = Path(os.path.realpath(step))
            for root in real_roots:
                if _inside(current, root) and not _inside(target, root):
                    raise OutsideWrite(f"{path} leads outside {root} through the symlink {step} (to {target}): "
                                       "sft-spec writes only inside the folders it names")
            step = target
        current = step
    return Path(path)


def output_path(value: str) -> Path:
    """The argparse type of every file or folder named on the command line to be written (``--json``,
    ``--html``, ``--history``, ``--output-dir``, ``--cache-dir``, ``-o``): check_written against the working
    directory and the project around it."""
    import argparse

    from sft_spec.config import project_root

    try:
        check_written(Path(value), Path.cwd(), *filter(None, [project_root(Path.cwd())]))
    except OutsideWrite as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return Path(value)

def named_files(item) -> dict[str, str | None]:
    """Every file the spec's training settings name (``chat_template_path``, ``deepspeed``, ...), as the hash
    of its contents: what a cache key holds, because the same name in another spec's folder, or an edited
    file, is another recipe."""
    out: dict[str, str | None] = {}
    for key, value in sorted(item.spec.training.items()):
        if not isinstance(value, str) or not value or "\n" in value:
            continue
        try:
            path = check_inside(item.folder, value, f"training.{key}")
        except ValueError:
            continue
        if path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
