"""The one rule for every file a spec names (data, templates, TRL's config files, a launcher's config): it
lies inside the spec file's own folder, however the run was started. No ``..``, absolute path, symlink out
or ``.git`` (a checkout's credentials live in ``.git/config``)."""

from pathlib import Path

from ..errors import relpath


def check_inside(folder: Path, relative: str, what: str = "path") -> Path:
    """``relative`` resolved against ``folder``; ValueError when it is absolute or lands outside it."""
    folder = Path(folder).resolve()
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{what}: expected a file path relative to the spec file, got {relative!r}")
    if Path(relative).expanduser().is_absolute() or relative.startswith("~"):
        raise ValueError(f"{what} {relative!r} is an absolute path: files a spec names must lie inside the spec "
                         f"directory {relpath(folder)} (give a path relative to the spec file)")
    try:
        target = (folder / relative).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ValueError(f"{what} {relative!r} cannot be resolved: {exc}") from None
    if target != folder and folder not in target.parents:
        link = " (through a symlink)" if ".." not in Path(relative).parts else ""
        raise ValueError(f"{what} {relative!r} is outside the spec directory {relpath(folder)}{link}")
    if ".git" in target.relative_to(folder).parts:
        raise ValueError(f"{what} {relative!r} is inside a .git folder: a spec never reads git's own files")
    return target
