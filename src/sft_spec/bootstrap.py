"""One bootstrap for the CLI, ``-n`` workers, the pytest bridge and launched processes, as pytest's
``_prepareconfig``: addopts, ``-p``/``-p no:``, broken plugins, essentials and options, decided once."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import __version__
from .config import Config, default_cache_dir, project_root, pyproject_defaults
from .errors import PluginProblem, UsageError
from .pluginmanager import ESSENTIAL_PLUGINS, PluginManager, build_registry, make_plugin_manager

#: Subcommands the core implements; plugins add the others (plugins, report, schema, init, cache, ...).
CORE_COMMANDS = ("run", "validate")


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad options; pytest (and so CI scripts) expect 4 for a usage error."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message}")


def _add_collection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                   help="spec files or folders (default: specs/ if it exists, else .)")
    p.add_argument("-k", dest="keyword", metavar="EXPR",
                   help="only run checks whose id matches EXPR (substrings; and/or/not, like pytest -k)")
    p.add_argument("-m", dest="markexpr", metavar="TAGEXPR", help="only run specs whose tags match TAGEXPR")
    p.add_argument("-p", dest="plugins", action="append", default=[], metavar="NAME",
                   help="load a plugin module by import name; -p no:NAME disables an installed one")
    p.add_argument("--rootdir", type=Path, help="the project folder shown in reports and where sft-defaults.yaml "
                   "lookup stops (default: the nearest folder above PATHs with pyproject.toml or .git)")
    p.add_argument("--cache-dir", type=Path, help="cache folder (default: $SFT_SPEC_CACHE or ~/.cache/sft-spec)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="one line per check")
    p.add_argument("-q", "--quiet", action="count", default=0, help="less output")
    p.add_argument("--tb", choices=("auto", "short", "long", "no"), default="auto",
                   help="traceback print mode for errors (default: auto = no traceback, message and location only)")


def make_parser(pm) -> argparse.ArgumentParser:
    parser = _Parser(prog="sft-spec", description="Train fine-tuning recipes from spec files and check what "
                     "the model learnt.")
    parser.add_argument("--version", action="version", version=f"sft-spec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", help="collect specs, train, generate and check")
    _add_collection_options(run)
    run.add_argument("-x", "--exitfirst", action="store_const", const=1, dest="maxfail",
                     help="stop after the first failed or broken spec")
    run.add_argument("--maxfail", type=int, default=0, metavar="N", help="stop after N failed or broken specs")
    run.add_argument("--collect-only", "--co", action="store_true", dest="collect_only",
                     help="list the test ids, do not train")
    run.add_argument("--output-dir", type=Path, default=None,
                     help="folder for trainer files (default: a fresh temporary folder, removed after the run)")
    pm.hook.sft_spec_addoption(parser=run.add_argument_group("plugin options"))
    validate = sub.add_parser("validate", help="check spec files without training (quick)")
    _add_collection_options(validate)
    for name, (help_text, add_arguments, _) in plugin_commands(pm).items():
        command = sub.add_parser(name, help=help_text)
        command.add_argument("-p", dest="plugins", action="append", default=[], metavar="NAME",
                             help="load a plugin module by import name; -p no:NAME disables an installed one")
        add_arguments(command)
    return parser


def plugin_commands(pm: PluginManager) -> dict[str, tuple[str, Any, Any]]:
    """Subcommands that plugins add (``sft-spec report``, ``sft-spec schema``, ...); a name the core or an
    earlier plugin has is a broken registration, reported as such."""
    if pm.commands is not None:
        return pm.commands
    commands: dict[str, tuple[str, Any, Any]] = {}
    owners: dict[str, str] = {}
    for impl in reversed(pm.hook.sft_spec_register_commands.get_hookimpls()):
        def register(name: str, help: str, add_arguments, run, _plugin=impl.plugin_name) -> None:
            taken = "the core" if name in CORE_COMMANDS else owners.get(name)
            if taken:
                pm.problems.append(PluginProblem(_plugin, f"subcommand {name!r} is {taken}'s already"))
                return
            owners[name] = f"plugin {_plugin!r}"
            commands[name] = (help, add_arguments, run)

        impl.function(register=register)
    pm.commands = commands
    return commands


def split_plugin_args(argv: Sequence[str]) -> tuple[set[str], list[str]]:
    """``-p no:NAME`` (disabled) and ``-p MODULE`` (to import) from a command line."""
    disabled, extra = set(), []
    for i, arg in enumerate(argv):
        value = None
        if arg == "-p" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("-p") and len(arg) > 2:
            value = arg[2:]
        if value:
            (disabled.add(value[3:]) if value.startswith("no:") else extra.append(value))
    return disabled, extra


@dataclass
class Prepared:
    """What :func:`prepare_config` built; ``config`` is None for commands that need none (``plugins``)."""

    command: str | None
    options: argparse.Namespace
    pluginmanager: PluginManager
    parser: argparse.ArgumentParser
    config: Config | None = None
    _tmp: tempfile.TemporaryDirectory | None = None

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def prepare_config(args: Sequence[str], *, plugins: Sequence[Any] = (), role: Literal["main", "worker"] = "main",
                   disable: Sequence[str] = (), paths: Sequence[Path] | None = None, rootdir: Path | None = None,
                   cache_dir: Path | None = None, output_dir: Path | None = None, addopts_from: Path | None = None,
                   addopts: bool = True) -> Prepared:
    """Build the plugin manager, parse ``args`` and make the Config (for ``run`` and ``validate``).

    Raises :class:`UsageError` for a bad command line or a disabled essential plugin. Broken plugins
    are in ``problems``. The caller calls ``sft_spec_configure`` and, at the end, ``close()``.
    ``paths``, ``rootdir``, ``cache_dir`` and ``output_dir`` override the command line (workers get the
    main process's, whose command line has the project's addopts in it already: ``addopts=False``).
    """
    argv = list(args)
    extra, _ = pyproject_defaults(addopts_from or Path.cwd()) if addopts else ([], None)
    if argv and extra:  # every command loads the project's plugins; run takes its other options too
        chosen = extra if argv[0] == "run" else [a for i, a in enumerate(extra) if a.startswith("-p")
                                                   or (i and extra[i - 1] == "-p")]
        argv = argv[:1] + chosen + argv[1:]
    asked_off, modules = split_plugin_args(argv)
    off = [name for name in ESSENTIAL_PLUGINS if name in asked_off]
    if off:
        raise UsageError(f"-p no:{off[0]}: {off[0]!r} is an essential built-in plugin; without it nothing would "
                         "be " + ("trained" if off[0] == "trainer" else "run") + " (disable a reporter instead)")
    pm = make_plugin_manager([*plugins, *modules], asked_off | set(disable))
    parser = make_parser(pm)
    options = parser.parse_args(argv)  # --help and --version print and raise SystemExit, as argparse does
    prepared = Prepared(options.command, options, pm, parser)
    if options.command not in ("run", "validate"):
        return prepared
    for name, value in vars(parser.parse_args(["run"])).items():  # validate sees every run option (defaults)
        if not hasattr(options, name):
            setattr(options, name, value)
    if options.command == "validate":
        options.collect_only = True
    chosen = list(paths) if paths is not None else options.paths
    if not chosen:
        chosen = [Path("specs") if Path("specs").is_dir() else Path(".")]
    options.paths = chosen
    missing = [p for p in chosen if not Path(p).exists()]
    if missing:
        raise UsageError(f"file or directory not found: {missing[0]}")
    if output_dir is None and options.output_dir is None:
        prepared._tmp = tempfile.TemporaryDirectory(prefix="sft-spec-")
        output_dir = Path(prepared._tmp.name)
    start = Path(os.path.commonpath([str((p if p.is_dir() else p.parent).resolve()) for p in map(Path, chosen)]))
    root = rootdir or options.rootdir or project_root(start) or start
    prepared.config = Config(
        options=options, pluginmanager=pm, registry=build_registry(pm), rootdir=Path(root).resolve(),
        cache_dir=Path(cache_dir or options.cache_dir or default_cache_dir()),
        output_dir=Path(output_dir or options.output_dir), invocation_args=argv, role=role,
    )
    return prepared
