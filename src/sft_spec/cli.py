"""``sft-spec``: run, validate and list plugins. Exit codes follow pytest (see :class:`ExitCode`)."""

from __future__ import annotations

import sys
from typing import Any

from .bootstrap import Prepared, plugin_commands, prepare_config
from .errors import UsageError
from .escape import safe
from .pluginmanager import ESSENTIAL_PLUGINS, PluginProblem, build_registry, plugin_infos
from .session import ExitCode, Session


def main(args: list[str] | None = None, plugins: list[Any] | None = None) -> int:
    """Entry point; also usable from Python (``sft_spec.cli.main([...], plugins=[obj])``) as pytest.main."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        prepared = prepare_config(argv, plugins=plugins or ())
    except UsageError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    except SystemExit as exc:  # --help and --version
        return int(exc.code or 0)
    try:
        return _dispatch(prepared)
    except UsageError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    finally:
        prepared.close()


def _dispatch(prepared: Prepared) -> int:
    command = prepared.command
    if command is None:
        prepared.parser.print_help()
        return ExitCode.USAGE_ERROR
    if command == "plugins":
        return _list_plugins(prepared.pluginmanager, prepared.problems)
    commands = plugin_commands(prepared.pluginmanager)
    if command in commands:
        return commands[command][2](prepared.options, prepared.pluginmanager)
    if any(p.name in ESSENTIAL_PLUGINS for p in prepared.problems):
        for problem in prepared.problems:
            print(f"ERROR: plugin {problem.name!r} could not be loaded: {problem.message}", file=sys.stderr)
        return ExitCode.INTERNAL_ERROR
    return run_session(prepared)


def _list_plugins(pm, problems: list[PluginProblem]) -> int:
    registry = build_registry(pm)
    for info in plugin_infos(pm):
        print(f"{info.name} {info.version}".rstrip() + f"  ({info.module})")
        print("    hooks: " + (", ".join(info.hooks) or "-"))
        for kind, table in (("formatters", registry.formatters), ("collators", registry.collators),
                            ("model loaders", registry.model_loaders), ("checks", registry.checks),
                            ("spec sections", registry.sections)):
            names = [n for n, v in table.items() if v.plugin == info.name]
            if names:
                print(f"    {kind}: {', '.join(names)}")
    for shadowed in registry.shadowed:
        print(f"note: {shadowed}")
    for problem in problems:
        print(f"BROKEN {problem.name}: {problem.message}")
    return ExitCode.INTERNAL_ERROR if problems else ExitCode.OK


def run_session(prepared: Prepared) -> int:
    """``run`` and ``validate``: configure, collect, run through the loop hook, report, unconfigure."""
    config = prepared.config
    assert config is not None
    options, pm = config.options, config.pluginmanager
    session = Session(config, prepared.problems)
    exitstatus: int = ExitCode.INTERNAL_ERROR
    configured = False
    try:
        pm.hook.sft_spec_configure(config=config)
        configured = True
        session.collect(list(options.paths))
        if options.collect_only:
            exitstatus = _report_collection(session, options)
            return exitstatus
        pm.hook.sft_spec_session_start(session=session)
        for report in session.collect_errors:
            session.log_report(report)
        try:
            pm.hook.sft_spec_runtestloop(session=session)
        except KeyboardInterrupt:
            session.interrupted = True
        exitstatus = session.exitstatus()
        return exitstatus
    except KeyboardInterrupt:
        session.interrupted = True
        exitstatus = ExitCode.INTERRUPTED
        return exitstatus
    finally:
        if configured and not options.collect_only:
            try:
                pm.hook.sft_spec_session_finish(session=session, exitstatus=int(exitstatus))
            except KeyboardInterrupt:
                pass
        if configured:
            pm.hook.sft_spec_unconfigure(config=config)


def _report_collection(session: Session, options) -> int:
    quiet = options.quiet
    for item in session.items:
        if quiet:
            for case in item.selected_cases:
                print(safe(case.nodeid))
            continue
        print(safe(f"<Spec {item.nodeid}>" + (f"  tags: {', '.join(item.tags)}" if item.tags else "")))
        for note in item.notes:
            print(f"  {safe(note)}")
        for exp in item.selected_expectations:
            print(safe(f"  <Expectation {exp.nodeid.rsplit('::', 1)[1]}> {exp.prompt_text!r}: {exp.describe()}"))
        for check in item.selected_training_checks:
            print(safe(f"  <Check checks[{check.name}]> {check.argument!r}"))
    for report in session.collect_errors:
        message = report.error.message if report.error else ""
        print(safe("ERROR " + message.replace("\n", "\n      ")))
    n_checks = sum(len(i.selected_cases) for i in session.items)
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
