"""The pytest plugin's session: options, hooks checked, whole-run reports and what a failed save does, under
`pytest specs/` and with xdist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from pytest_projects import SKIPPED, make_project, run_pytest

MISSPELLED_AT_CONFIGURE = """\
from sft_spec import hookimpl


class Reporter:
    @hookimpl
    def sft_spec_log_reprot(self, report):  # misspelled: would never be called
        pass


@hookimpl
def sft_spec_configure(config):
    if config.role in {roles}:
        config.pluginmanager.register(Reporter(), "misspelled-reporter")
"""


def test_spec_files_need_an_explicit_path_or_the_ini_option(tmp_path):
    project = make_project(tmp_path)
    plain = run_pytest(project, "--co", "-q")
    assert plain.returncode == 5 and "::" not in plain.stdout, plain.stdout
    (project / "pytest.ini").write_text("[pytest]\nsft_spec_collect = true\n", encoding="utf-8")
    listed = run_pytest(project, "--co", "-q").stdout
    assert "specs/learn.sft.yaml::learn::expect[0]" in listed


def test_a_misspelled_hook_registered_at_configure_is_an_error_under_pytest(tmp_path):
    # The CLI checked hook names after configure (pluggy's check_pending); `pytest specs/` did not, so a
    # reporter with a typo was silently never called. One session lifecycle now checks it everywhere.
    project = make_project(tmp_path)
    (project / "misspelled.py").write_text(MISSPELLED_AT_CONFIGURE.format(roles='("main", "worker")'),
                                           encoding="utf-8")
    run = run_pytest(project, "specs/later.sft.yaml", "--sft-spec-args=-p misspelled")
    assert run.returncode != 0, run.stdout
    assert "sft_spec_log_reprot" in run.stdout + run.stderr, run.stdout + run.stderr


def test_a_misspelled_hook_registered_in_a_worker_is_an_error_under_n(tmp_path, monkeypatch, sft):
    project = make_project(tmp_path)
    (project / "misspelled.py").write_text(MISSPELLED_AT_CONFIGURE.format(roles='("worker",)'), encoding="utf-8")
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.setenv("PYTHONPATH", str(project))
    (project / "specs" / "later.sft.yaml").write_text(
        textwrap.dedent(SKIPPED).replace("skip: not today\n", "training: {max_steps: 1}\n"), encoding="utf-8")
    result = sft("run", "specs/later.sft.yaml", "-n", "2", "--no-cache", "-p", "misspelled")
    assert result.code != 0, result.out
    assert "sft_spec_log_reprot" in result.out + result.err, result.out + result.err


def test_run_options_that_make_sense_under_pytest_are_pytest_options(tmp_path):
    project = make_project(tmp_path)
    run = run_pytest(project, "specs/later.sft.yaml", "--sft-spec-json", "r.json", "--sft-spec-no-cache", "-rs")
    assert (project / "r.json").is_file(), run.stdout + run.stderr  # a skipped spec is reported, as by the CLI
    assert "SKIPPED [1] specs/later.sft.yaml:8: not today" in run.stdout, run.stdout  # at the case
    (skipped,) = json.loads((project / "r.json").read_text(encoding="utf-8"))["specs"]
    assert skipped["outcome"] == "skipped" and skipped["skip_reason"] == "not today"
    run = run_pytest(project, "specs/later.sft.yaml", "--sft-spec-timeout", "soon")
    assert run.returncode != 0 and "--timeout" in run.stdout + run.stderr, run.stdout + run.stderr
    help_text = run_pytest(project, "--help").stdout
    assert "--sft-spec-timeout=SECONDS" in help_text and "--sft-spec-update-snapshots" in help_text


def test_every_pytest_option_names_a_run_option():
    from sft_spec.bootstrap import make_parser
    from sft_spec.pluginmanager import make_plugin_manager
    from sft_spec_plugins.pytest_plugin import PYTEST_OPTIONS

    run = make_parser(make_plugin_manager())._subparsers._group_actions[0].choices["run"]
    known = {flag: action for action in run._actions for flag in action.option_strings}
    for flag, (run_flag, metavar) in PYTEST_OPTIONS.items():
        assert run_flag in known, flag
        assert (metavar is None) == (known[run_flag].nargs == 0), flag  # a flag stays a flag


def test_a_whole_run_report_under_xdist_is_refused_not_overwritten(tmp_path):
    # Each xdist worker has its own sft-spec session: r.json held one worker's specs.
    project = make_project(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(project)}  # with xdist's plugin autoloaded
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "specs/",
                          "--sft-spec-json", "r.json"], cwd=project, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 4, run.stdout + run.stderr
    assert "--json writes one file for the whole run" in run.stderr and not (project / "r.json").exists()


def test_a_session_that_could_not_be_configured_runs_no_spec(tmp_path):
    # With --continue-on-collection-errors, the next spec file was collected on the half-built session.
    project = make_project(tmp_path)
    (project / "crashcfg.py").write_text("from sft_spec import hookimpl\n\n\n@hookimpl\n"
                                         "def sft_spec_configure(config):\n"
                                         "    raise RuntimeError('configure bug')\n", encoding="utf-8")
    run = run_pytest(project, "specs/", "--sft-spec-args=-p crashcfg", "--continue-on-collection-errors", "-rA")
    assert run.returncode != 0, run.stdout
    assert run.stdout.count("configure bug") >= 2, run.stdout  # both files say why
    assert " passed" not in run.stdout.splitlines()[-1] and " skipped" not in run.stdout.splitlines()[-1], run.stdout


def test_a_spec_whose_files_could_not_be_saved_is_an_error_under_pytest(tmp_path):
    # pytest shows the report as logged (persisting is the last step of making it), not the one before.
    project = make_project(tmp_path)
    (project / "full_disk.py").write_text("from sft_spec import hookimpl\n\n\n@hookimpl\n"
                                          "def sft_spec_persist_report(report, session):\n"
                                          "    raise OSError('No space left on device')\n", encoding="utf-8")
    run = run_pytest(project, "specs/later.sft.yaml", "-v", "--sft-spec-args=--no-cache -p full_disk")
    assert "could not save the files this spec records" in run.stdout, run.stdout
    assert "SKIPPED" not in run.stdout and run.returncode == 1, run.stdout  # a skipped spec is saved too
