"""``sft-spec``: run, validate and list plugins. Exit codes follow pytest (see :class:`ExitCode`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config, pyproject_defaults
from .errors import UsageError
from .fileio import default_cache_dir
from .plugins import PluginProblem, build_registry, make_plugin_manager, plugin_infos
from .session import ExitCode, Session


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
    p.add_argument("--rootdir", type=Path, help="folder that data and template paths must stay in "
                   "(default: the common folder of PATHs)")
    p.add_argument("--cache-dir", type=Path, help="cache folder (default: $SFT_SPEC_CACHE or ~/.cache/sft-spec)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="one line per check")
    p.add_argument("-q", "--quiet", action="count", default=0, help="less output")
    p.add_argument("--tb", choices=("auto", "short", "long", "no"), default="auto",
                   help="traceback print mode for errors (default: auto = no traceback, message and location only)")


def make_parser(pm=None) -> argparse.ArgumentParser:
    parser = _Parser(prog="sft-spec", description="Train fine-tuning recipes from spec files and check what "
                     "the model learnt.")
    parser.add_argument("--version", action="version", version=f"sft-spec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", help="collect specs, train, generate and check")
    _add_collection_options(run)
    run.add_argument("-x", "--exitfirst", action="store_const", const=1, dest="maxfail",
                     help="stop after the first failed or broken spec")
    run.add_argument("--maxfail", type=int, default=0, metavar="N", help="stop after N failed or broken specs")
    run.add_argument("-n", "--numprocesses", dest="numprocesses", default=None, metavar="N",
                     help="run specs in N worker processes ('auto': one per GPU, else per CPU core); "
                     "reports keep collection order")
    run.add_argument("--collect-only", "--co", action="store_true", dest="collect_only",
                     help="list the test ids, do not train")
    run.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                     help="where to train (default: cuda when present, else cpu)")
    run.add_argument("--allow-remote-code", action="store_true",
                     help="let specs that ask for trust_remote_code run the model repository's code")
    run.add_argument("--allow-pickle", action="store_true",
                     help="allow pickle-based checkpoints (.bin); safetensors only by default")
    run.add_argument("--output-dir", type=Path, default=None,
                     help="folder for trainer files (default: a fresh temporary folder, removed after the run)")
    if pm is not None:
        group = run.add_argument_group("plugin options")
        pm.hook.sft_spec_addoption(parser=group)
    validate = sub.add_parser("validate", help="check spec files without training (quick)")
    _add_collection_options(validate)
    sub.add_parser("plugins", help="list installed plugins, their versions and hooks")
    if pm is not None:
        for name, (help_text, add_arguments, _) in plugin_commands(pm).items():
            add_arguments(sub.add_parser(name, help=help_text))
    return parser


def plugin_commands(pm) -> dict[str, tuple[str, Any, Any]]:
    """Subcommands that plugins add (``sft-spec report``, ``sft-spec schema``, ...)."""
    commands: dict[str, tuple[str, Any, Any]] = {}

    def register(name: str, help: str, add_arguments, run) -> None:
        commands.setdefault(name, (help, add_arguments, run))

    pm.hook.sft_spec_register_commands(register=register)
    return commands


def _disabled(argv: list[str]) -> tuple[set[str], list[str]]:
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


def main(args: list[str] | None = None, plugins: list[Any] | None = None) -> int:
    """Entry point; also usable from Python (``sft_spec.cli.main([...], plugins=[obj])``) as pytest.main."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        addopts, _ = pyproject_defaults(Path.cwd())
    except UsageError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    if argv and argv[0] == "run" and addopts:
        argv = argv[:1] + addopts + argv[1:]
    disabled, extra_modules = _disabled(argv)
    problems: list[PluginProblem] = []
    pm = make_plugin_manager(list(plugins or []) + extra_modules, disabled, problems)
    try:
        parser = make_parser(pm)
        options = parser.parse_args(argv)
    except UsageError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    except SystemExit as exc:  # --help and --version
        return int(exc.code or 0)
    if options.command is None:
        parser.print_help()
        return ExitCode.USAGE_ERROR
    if options.command == "plugins":
        return _list_plugins(pm, problems)
    commands = plugin_commands(pm)
    if options.command in commands:
        try:
            return commands[options.command][2](options, pm)
        except UsageError as exc:
            print(f"ERROR: {exc}", file=sys.stderr)
            return ExitCode.USAGE_ERROR
    for problem in problems:
        print(f"ERROR: plugin {problem.name!r} could not be loaded: {problem.message}", file=sys.stderr)
    if any(p.name in ("models", "trainer", "terminal") for p in problems):
        return ExitCode.INTERNAL_ERROR
    return _run(options, pm, argv)


def _list_plugins(pm, problems: list[PluginProblem]) -> int:
    registry = build_registry(pm)
    for info in plugin_infos(pm):
        print(f"{info.name} {info.version}".rstrip() + f"  ({info.module})")
        print("    hooks: " + (", ".join(info.hooks) or "-"))
        for kind, table in (("formatters", registry.formatters), ("collators", registry.collators),
                            ("model loaders", registry.model_loaders)):
            names = [n for n, v in table.items() if v.plugin == info.name]
            if names:
                print(f"    {kind}: {', '.join(names)}")
    checks = ", ".join(registry.checks)
    print(f"checks: {checks}")
    for problem in problems:
        print(f"BROKEN {problem.name}: {problem.message}")
    return ExitCode.INTERNAL_ERROR if problems else ExitCode.OK


def _common_root(paths: list[Path]) -> Path:
    import os

    dirs = [str((p if p.is_dir() else p.parent).resolve()) for p in paths]
    return Path(os.path.commonpath(dirs)) if dirs else Path.cwd()


def _run(options: argparse.Namespace, pm, argv: list[str]) -> int:
    import tempfile

    paths = options.paths or [Path("specs") if Path("specs").is_dir() else Path(".")]
    options.paths = paths
    for name, default in (("maxfail", 0), ("collect_only", options.command == "validate"), ("device", "auto"),
                          ("allow_remote_code", False), ("allow_pickle", False), ("output_dir", None)):
        if not hasattr(options, name):
            setattr(options, name, default)
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"ERROR: file or directory not found: {missing[0]}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    tmp = None
    output_dir = options.output_dir
    if output_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="sft-spec-")
        output_dir = Path(tmp.name)
    config = Config(
        options=options, pluginmanager=pm, registry=build_registry(pm),
        rootdir=(options.rootdir or _common_root(paths)).resolve(),
        cache_dir=options.cache_dir or default_cache_dir(), output_dir=output_dir, invocation_args=argv,
    )
    session = Session(config)
    exitstatus: int = ExitCode.INTERNAL_ERROR
    configured = False
    try:
        pm.hook.sft_spec_configure(config=config)
        configured = True
        session.collect(paths)
        if options.command == "validate" or options.collect_only:
            return _report_collection(session, options)
        pm.hook.sft_spec_session_start(session=session)
        for report in session.collect_errors:
            session.log_report(report)
        try:
            if getattr(options, "numprocesses", None) not in (None, "0"):
                from .parallel import run_parallel

                run_parallel(session, options.numprocesses, argv)
            else:
                session.run_items()
        except KeyboardInterrupt:
            session.interrupted = True
        exitstatus = session.exitstatus()
        return exitstatus
    except UsageError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        exitstatus = ExitCode.USAGE_ERROR
        return exitstatus
    except KeyboardInterrupt:
        session.interrupted = True
        exitstatus = ExitCode.INTERRUPTED
        return exitstatus
    finally:
        if configured and options.command == "run" and not options.collect_only:
            try:
                pm.hook.sft_spec_session_finish(session=session, exitstatus=int(exitstatus))
            except KeyboardInterrupt:
                pass
        if configured:
            pm.hook.sft_spec_unconfigure(config=config)
        if tmp is not None:
            tmp.cleanup()


def _report_collection(session: Session, options) -> int:
    quiet = options.quiet
    for item in session.items:
        if quiet:
            for exp in item.selected_expectations:
                print(exp.nodeid)
            for name, _, _ in item.training_checks:
                print(f"{item.nodeid}::checks[{name}]")
            continue
        print(f"<Spec {item.nodeid}>" + (f"  tags: {', '.join(item.tags)}" if item.tags else ""))
        for note in item.notes:
            print(f"  {note}")
        for exp in item.selected_expectations:
            print(f"  <Expectation {exp.nodeid.rsplit('::', 1)[1]}> {exp.prompt_text!r}: {exp.describe()}")
        for name, arg, _ in item.training_checks:
            print(f"  <Check checks[{name}]> {arg!r}")
    for report in session.collect_errors:
        print(f"ERROR {report.error.message}" if "\n" not in report.error.message
              else "ERROR " + report.error.message.replace("\n", "\n      "))
    n_checks = sum(len(i.selected_expectations) + len(i.training_checks) for i in session.items)
    summary = f"{len(session.items)} specs, {n_checks} checks"
    if session.deselected:
        summary += f" ({session.deselected} deselected)"
    if session.collect_errors:
        summary += f", {len(session.collect_errors)} error{'s' if len(session.collect_errors) > 1 else ''}"
    verb = "valid" if options.command == "validate" and not session.collect_errors else "collected"
    print(f"{summary} {verb}")
    if session.collect_errors:
        return ExitCode.TESTS_FAILED
    return ExitCode.OK if session.items else ExitCode.NO_TESTS_COLLECTED
