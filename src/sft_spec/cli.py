"""``sft-spec``: run, validate and list plugins. Exit codes follow pytest (see :class:`ExitCode`)."""

from __future__ import annotations

import sys
import traceback
from typing import Any

import pluggy

from .bootstrap import Prepared, plugin_commands, prepare_config
from .errors import UsageError
from .pluginmanager import ESSENTIAL_PLUGINS
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
    commands = plugin_commands(prepared.pluginmanager)
    if command in commands:
        return commands[command][2](prepared.options, prepared.pluginmanager)
    if any(p.name in ESSENTIAL_PLUGINS for p in prepared.pluginmanager.problems):
        for problem in prepared.pluginmanager.problems:
            print(f"ERROR: plugin {problem.name!r} could not be loaded: {problem.message}", file=sys.stderr)
        return ExitCode.INTERNAL_ERROR
    return run_session(prepared)


def run_session(prepared: Prepared) -> int:
    """``run`` and ``validate``: configure, collect, run through the loop hook, report, unconfigure."""
    config = prepared.config
    assert config is not None
    options, pm = config.options, config.pluginmanager
    session = Session(config)
    exitstatus: int = ExitCode.INTERNAL_ERROR
    try:
        session.configure()
        session.collect(list(options.paths))
        pm.hook.sft_spec_collection_finish(session=session)
        if options.collect_only:
            exitstatus = _collection_exitstatus(session)
        else:
            session.start()
            for report in session.collect_errors:
                session.log_report(report)
            try:
                pm.hook.sft_spec_runtestloop(session=session)
            except KeyboardInterrupt:
                session.interrupted = True
            exitstatus = session.exitstatus()
    except KeyboardInterrupt:
        session.interrupted = True
        exitstatus = ExitCode.INTERRUPTED
    except pluggy.PluginValidationError as exc:
        exitstatus = ExitCode.USAGE_ERROR
        name = config.pluginmanager.get_name(exc.plugin) or type(exc.plugin).__name__
        raise UsageError(f"plugin {name!r}: {exc}") from None
    except UsageError:  # the reports say what the process exits with
        exitstatus = ExitCode.USAGE_ERROR
        raise
    except Exception:  # noqa: BLE001 - a plugin's bug: pytest's INTERNALERROR, and the reports still written
        session.internal_errors.append(traceback.format_exc().rstrip())
        exitstatus = ExitCode.INTERNAL_ERROR
    finally:
        session.finish(exitstatus)
        session.unconfigure()
        for problem in session.internal_errors:
            print("\n".join(f"INTERNALERROR> {line}" for line in problem.split("\n")), file=sys.stderr)
    return ExitCode.INTERNAL_ERROR if session.internal_errors else exitstatus


def _collection_exitstatus(session: Session) -> int:
    if session.collect_errors:
        return ExitCode.TESTS_FAILED
    return ExitCode.OK if session.items else ExitCode.NO_TESTS_COLLECTED
