"""pytest plugin: ``pytest specs/`` collects ``*.sft.yaml`` files and runs them as tests.

Test ids are those of ``sft-spec run``: a file node (``specs/blog-recipe.sft.yaml``), a node per spec
item (``blog-recipe[lora]``) and one test per expectation or training check (``expect[0]``,
``checks[loss_decreased]``), so ``-k``, ``-x``, ``--lf``, ``--junitxml``, pytest-html and pytest-xdist
work as usual. (pytest names files relative to its rootdir, sft-spec relative to the working
directory: the ids are equal when pytest runs from the project root with its config file there.)

Both front ends share one implementation: an sft-spec plugin manager, :class:`~sft_spec.config.Config`
and :class:`~sft_spec.session.Session`, built once per pytest session, collect the files and run each
spec through the hook ``sft_spec_run_spec``. A spec trains once: the first of its tests to run starts
it (in that test's setup) and the report is kept on the spec node; every test then reads its own
expectation's result. A spec error (broken YAML, unknown key, failing load) is a collection error or
a setup error carrying the located message, without a Python traceback. A failed expectation shows
the same text as the terminal reporter (:func:`sft_spec_plugins.report.failures.format_failure`). The bridge is
bootstrapped like ``sft-spec run`` (:func:`sft_spec.bootstrap.prepare_config`), so data paths, defaults
files and plugins follow the same rules under both. Tags become
markers (``-m smoke``); ``xfail:`` becomes pytest's xfail mark, and a ``skip:`` spec is skipped by its run
(so whole-run reports list it, as ``sft-spec run``'s do).

When are spec files collected? Not by accident: a project's plain ``pytest`` run (``testpaths``) must
not start training, nor trip over broken specs kept as test fixtures. A ``*.sft.yaml`` file is
collected when

* it is, or lies below, a path given explicitly on the command line (``pytest specs/``,
  ``pytest specs/blog-recipe.sft.yaml``); paths that pytest takes from ``testpaths`` or the current
  folder do not count; or
* the ini option ``sft_spec_collect = true`` is set (then wherever pytest looks).

Options of ``sft-spec run`` that make sense under pytest are pytest options with an ``--sft-spec-``
prefix (:data:`PYTEST_OPTIONS`: ``--sft-spec-timeout``, ``--sft-spec-no-cache``, ...); any other goes
through ``--sft-spec-args="--on-unsupported skip"``; ``[tool.sft-spec] addopts`` in pyproject.toml
applies as for the command line. Parallel runs use pytest-xdist with one spec per worker group:
``pytest -n 4 --dist loadscope specs/`` (``loadscope`` keeps a spec's tests together, so it trains once;
use ``--dist loadfile`` when recording snapshots or baselines, which are written per spec file).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from sft_spec.loading import is_spec_file

from .common.escape import safe

if TYPE_CHECKING:
    from sft_spec.bootstrap import Prepared
    from sft_spec.reports import ExpectationReport, SpecReport
    from sft_spec.session import Session
    from sft_spec.state import SpecItem


#: Deprecation warnings the training libraries raise inside themselves while a spec runs: not the user's
#: code, so not in their warnings summary (their own DeprecationWarnings still show).
LIBRARY_WARNINGS = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")


#: Run options that write one file for the whole run: under pytest-xdist each worker has a session of
#: its own, and each would overwrite the others' file.
WHOLE_RUN_FILES = ("--json", "--html", "--md", "--history", "--github-summary")


def pytest_configure(config: pytest.Config) -> None:
    for module in LIBRARY_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore::DeprecationWarning:{module}")
    if config.getoption("numprocesses", None) and not hasattr(config, "workerinput"):
        asked = [flag for flag in (a.split("=", 1)[0] for a in run_arguments(config)) if flag in WHOLE_RUN_FILES]
        if asked:
            raise pytest.UsageError(
                f"sft-spec's {asked[0]} writes one file for the whole run, and under pytest-xdist "
                "(-n) each worker would write its own over the others'; use pytest's --junitxml, or "
                "`sft-spec run -n N` for sft-spec's reports")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("sft_spec_collect", type="bool", default=False,
                  help="collect *.sft.yaml files wherever pytest looks (default: only below paths given "
                  "on the command line)")
    group = parser.getgroup("sft-spec", "sft-spec (fine-tuning spec files)")
    group.addoption("--sft-spec-args", dest="sft_spec_args", default="", metavar="ARGS",
                    help='options of `sft-spec run` for the specs, e.g. "--device cpu --update-snapshots"')
    for flag, (run_flag, metavar) in PYTEST_OPTIONS.items():
        if metavar is None:
            group.addoption(flag, action="store_true", default=False, help=f"as `sft-spec run {run_flag}`")
        else:
            group.addoption(flag, default=None, metavar=metavar, help=f"as `sft-spec run {run_flag}`")


#: ``sft-spec run`` options that make sense under pytest, as pytest options (``--sft-spec-timeout 600``):
#: pytest option -> (the run option, its metavar or None for a flag). pytest has its own -k, -m, --lf,
#: --junitxml, --color and -n; every other run option goes through --sft-spec-args. The run's parser checks
#: the values, so an error reads as `sft-spec run` says it.
PYTEST_OPTIONS = {
    "--sft-spec-timeout": ("--timeout", "SECONDS"),
    "--sft-spec-device": ("--device", "DEVICE"),
    "--sft-spec-on-unsupported": ("--on-unsupported", "POLICY"),
    "--sft-spec-no-cache": ("--no-cache", None),
    "--sft-spec-update-snapshots": ("--update-snapshots", None),
    "--sft-spec-update-baselines": ("--update-baselines", None),
    "--sft-spec-stop-when-learnt": ("--stop-when-learnt", None),
    "--sft-spec-deterministic": ("--deterministic", None),
    "--sft-spec-allow-remote-code": ("--allow-remote-code", None),
    "--sft-spec-allow-pickle": ("--allow-pickle", None),
    "--sft-spec-json": ("--json", "PATH"),
    "--sft-spec-html": ("--html", "PATH"),
    "--sft-spec-md": ("--md", "PATH"),
    "--sft-spec-history": ("--history", "DIR"),
}


def run_arguments(config: pytest.Config) -> list[str]:
    """The ``sft-spec run`` command line a pytest command line asks for: --sft-spec-args, then the options
    above that were given."""
    argv = shlex.split(config.getoption("sft_spec_args") or "")
    for flag, (run_flag, metavar) in PYTEST_OPTIONS.items():
        value = config.getoption(flag.lstrip("-").replace("-", "_"))
        if metavar is None and value:
            argv.append(run_flag)
        elif metavar is not None and value is not None:
            argv += [run_flag, str(value)]
    return argv


class _Bridge:
    """The sft-spec side of a pytest session: plugin manager, Config and Session, built once."""

    def __init__(self, config: pytest.Config):
        self.pytest_config = config
        self._session: Session | None = None
        self._prepared: Prepared | None = None
        self.started = False
        self.problems_shown = False  # broken plugins are reported once, by the first spec file
        self._broken: BaseException | None = None  # why the session could not be configured

    @property
    def session(self) -> Session:
        if self._broken is not None:  # every spec file says it, none runs on a half-built session
            raise self._broken
        if self._session is None:
            self._session = self._build()
        return self._session

    def _build(self) -> Session:
        from sft_spec.bootstrap import prepare_config
        from sft_spec.session import Session

        rootdir = Path(self.pytest_config.rootpath)
        argv = ["run", *run_arguments(self.pytest_config)]
        # pytest's own terminal reporter prints; pytest's paths and rootdir are the run's.
        # pytest's own arguments are paths or node ids (specs/x.sft.yaml::x[lora]): the files they name.
        paths = [Path(a.split("::", 1)[0]) for a in self.pytest_config.args]
        self._prepared = prepare_config(argv, disable=["terminal"], paths=paths, rootdir=rootdir, addopts_from=rootdir)
        session = Session(self._prepared.config)
        self._session = session  # closed by close() even when configure raised
        try:
            session.configure()
        except BaseException as exc:
            self._broken = exc
            raise
        return session

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.session.start()

    def finish(self, exitstatus: int) -> None:
        if self._session is not None and self.started:
            self._session.finish(exitstatus)
            if self._session.internal_errors:  # after every reporter ran: pytest's INTERNALERROR, as before
                raise RuntimeError("\n".join(self._session.internal_errors))

    def summary(self, write_line) -> None:
        if self._session is not None and self.started:
            self._session.hook.sft_spec_terminal_summary(session=self._session, write_line=write_line)

    def close(self) -> None:
        if self._session is not None:
            self._session.unconfigure()
        if self._prepared is not None:
            self._prepared.close()
        self._session = None


_BRIDGE = pytest.StashKey[_Bridge]()


def _bridge(config: pytest.Config) -> _Bridge:
    if _BRIDGE not in config.stash:
        config.stash[_BRIDGE] = _Bridge(config)
    return config.stash[_BRIDGE]


def _explicit_paths(config: pytest.Config) -> list[Path]:
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        return []
    base = Path(config.invocation_params.dir)
    return [(base / arg.split("::", 1)[0]).resolve() for arg in config.args]


def _wanted(config: pytest.Config, path: Path) -> bool:
    if config.getini("sft_spec_collect"):
        return True
    resolved = path.resolve()
    return any(resolved == p or p in resolved.parents for p in _explicit_paths(config))


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if is_spec_file(file_path) and _wanted(parent.config, file_path):
        return SpecFile.from_parent(parent, path=file_path)
    return None


class SpecFile(pytest.File):
    """One ``*.sft.yaml`` file: its spec items (one per matrix entry) are its children."""

    def collect(self) -> Iterator[SpecNode]:
        from sft_spec.errors import UsageError

        try:
            session = _bridge(self.config).session
        except UsageError as exc:
            raise self.CollectError(f"sft-spec: {exc}") from None
        bridge = _bridge(self.config)
        if not bridge.problems_shown:  # as `sft-spec run` reports them: an error each, and the specs still run
            bridge.problems_shown = True
            for problem in session.config.pluginmanager.problems:
                yield ProblemItem.from_parent(self, name=safe(f"plugin:{problem.name}"),
                                              message=f"sft-spec: plugin {problem.name!r} is broken: {problem.message}")
        first_item, first_error = len(session.items), len(session.collect_errors)
        session.collect([self.path])
        for report in session.collect_errors[first_error:]:  # the file's broken matrix entries, or all of it
            yield ProblemItem.from_parent(self, name="collect", message=report.error.message if report.error else "")
        for item in session.items[first_item:]:
            # Names become pytest's node ids, printed raw in its headers and summary: control characters of a
            # spec's name are escaped, as pytest escapes parametrize ids.
            yield SpecNode.from_parent(self, name=safe(item.nodeid.split("::", 1)[1]), spec_item=item)


class SpecNode(pytest.Collector):
    """One spec item (``blog-recipe[lora]``): trains once, keeps its report for its tests."""

    def __init__(self, *, spec_item: SpecItem, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec_item = spec_item
        self.report: SpecReport | None = None
        spec = spec_item.spec
        for tag in spec.tags:
            _register_marker(self.config, tag)
            self.add_marker(tag)
        # skip: is decided by the run (a report that --sft-spec-json and the others list, as `sft-spec run`'s),
        # then each case's setup skips with its reason.
        if spec.xfail:
            self.add_marker(pytest.mark.xfail(reason=spec.xfail.reason, strict=spec.xfail.strict))

    def collect(self) -> Iterator[CaseItem]:
        item = self.spec_item
        for exp in item.selected_expectations:
            case = CaseItem.from_parent(self, name=safe(exp.nodeid.rsplit("::", 1)[1]), case_id=exp.nodeid,
                                        line=exp.location.line)
            if exp.xfail:
                case.add_marker(pytest.mark.xfail(reason=exp.xfail.reason, strict=exp.xfail.strict))
            yield case
        for check in item.selected_training_checks:
            case = CaseItem.from_parent(self, name=safe(check.nodeid.rsplit("::", 1)[1]), case_id=check.nodeid,
                                        line=check.location.line)
            if check.xfail:  # an eval set's own xfail
                case.add_marker(pytest.mark.xfail(reason=check.xfail.reason, strict=check.xfail.strict))
            yield case

    def run_once(self) -> SpecReport:
        if self.report is None:
            bridge = _bridge(self.config)
            bridge.start()
            session = bridge.session
            self.report = session.log_report(session.run_item(self.spec_item))
        return self.report


def _register_marker(config: pytest.Config, tag: str) -> None:
    known = {line.split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")}
    if tag not in known:
        config.addinivalue_line("markers", f"{tag}: sft-spec tag")


class CaseItem(pytest.Item):
    """One expectation (``expect[0]``) or training check (``checks[loss_decreased]``) of a spec."""

    def __init__(self, *, case_id: str, line: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.case_id = case_id
        self.line = line

    @property
    def spec_node(self) -> SpecNode:
        assert isinstance(self.parent, SpecNode)
        return self.parent

    def setup(self) -> None:
        report = self.spec_node.run_once()
        if report.outcome == "interrupted":
            raise KeyboardInterrupt
        if report.outcome == "skipped":  # located at the case, as a skip mark would be (not at this line)
            raise pytest.skip.Exception(safe(report.skip_reason or "skipped"), _use_item_location=True)
        if report.outcome == "error":
            pytest.fail(safe(_error_text(report, self.config.getoption("tbstyle", "auto")), keep_newlines=True),
                        pytrace=False)

    def runtest(self) -> None:
        report = self.spec_node.report
        case = _case(report, self.case_id) if report else None
        if case is None:
            pytest.fail(f"{self.case_id}: the spec ran without this check", pytrace=False)
        if case.answer is not None:
            self.user_properties.append(("answer", case.answer))
        if case.outcome == "skipped":
            pytest.skip("skipped")
        if case.outcome in ("failed", "xfailed"):
            from sft_spec.reports import XPASS_STRICT

            from .report.failures import format_failure

            # The first line is what pytest's short summary shows: say which check failed and why.
            first = next((c for c in case.checks if not c.passed), None)
            if first is not None and first.name == XPASS_STRICT:
                return  # the checks passed: pytest's own xfail(strict=True) mark reports XPASS(strict)
            headline = [f"{first.name}: {first.message}"] if first and first.message else []
            shown = headline + [text for text, _ in format_failure(case, report.losses)]
            pytest.fail(safe("\n".join(shown), keep_newlines=True), pytrace=False)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        # Without the file part: pytest shows it already, and rewrites dots in a "domain" into "::".
        return self.path, (self.line - 1 if self.line else None), safe(self.case_id.split("::", 1)[1])


class ProblemItem(pytest.Item):
    """A broken plugin, or a spec file (or matrix entry) that did not load: an error of its own, as in
    ``sft-spec run``, so the other specs still run (pytest's collection errors would stop them all)."""

    def __init__(self, *, message: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.message = message

    def setup(self) -> None:
        # The located messages are the whole story: no traceback. Failing in setup makes it an ERROR.
        pytest.fail(safe(self.message, keep_newlines=True), pytrace=False)

    def runtest(self) -> None:  # never reached: setup fails
        pass

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, self.name


def _case(report: SpecReport, case_id: str) -> ExpectationReport | None:
    return next((c for c in report.cases if c.nodeid == case_id), None)


def _error_text(report: SpecReport, tbstyle: str) -> str:
    error = report.error
    if error is None:
        return f"{report.nodeid}: error"
    lines = [line if line.startswith(error.location or "\0") else f"{error.location}: {line}"
             for line in error.message.splitlines()]
    if error.phase:
        lines.append(f"(phase {error.phase}" + (f", raised in plugin {error.plugin!r})" if error.plugin else ")"))
    if error.traceback and tbstyle == "long":
        lines.append(error.traceback.rstrip())
    return "\n".join(lines)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Deselected tests (``-k``, ``-m``, ``--lf``) are not generated or checked when their spec trains; with
    ``--co``, broken files and plugins are listed with their messages (they would be errors when run)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if session.config.option.collectonly and reporter is not None:
        for item in session.items:
            if isinstance(item, ProblemItem):
                reporter.write_line(f"ERROR {item.nodeid}: {safe(item.message, keep_newlines=True)}")
    kept: dict[SpecNode, set[str]] = {}
    for item in session.items:
        if isinstance(item, CaseItem):
            kept.setdefault(item.spec_node, set()).add(item.case_id)
    for node, ids in kept.items():
        for case in node.spec_item.cases:
            case.selected = case.selected and case.nodeid in ids
    bridge = session.config.stash.get(_BRIDGE, None)
    if bridge is not None and bridge._session is not None:
        sft_session = bridge._session
        chosen = {id(node.spec_item) for node in kept}
        sft_session.deselected += sum(1 for i in sft_session.items if id(i) not in chosen)
        sft_session.items[:] = [i for i in sft_session.items if id(i) in chosen]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    bridge = session.config.stash.get(_BRIDGE, None)
    if bridge is not None:
        bridge.finish(int(exitstatus))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """What sft-spec plugins add to the summary (snapshots recorded, result cache use, reports written)."""
    bridge = config.stash.get(_BRIDGE, None)
    if bridge is not None:
        lines: list[str] = []
        bridge.summary(lines.append)
        if lines:
            terminalreporter.section("sft-spec")
            for line in lines:
                terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    bridge = config.stash.get(_BRIDGE, None)
    if bridge is not None:
        bridge.close()
