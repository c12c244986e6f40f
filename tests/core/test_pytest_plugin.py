"""The pytest plugin: `pytest specs/` and `sft-spec run specs/` collect the same ids and agree on outcomes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SPEC = """\
    tags: [smoke]
    model: builtin:tiny-gemma
    method: lora
    lora: {r: 16, lora_alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}
    training: {num_train_epochs: 3, learning_rate: 1.0e-2, per_device_train_batch_size: 8}
    data:
      conversations:
        - - {role: user, content: 微调测试}
          - {role: assistant, content: 我学会了}
    expect:
      - prompt: 微调测试
        not_contains: zzz
      - prompt: 微调测试
        equals: 我学会了吗
    checks:
      loss_decreased: true
"""

SKIPPED = """\
    skip: not today
    model: builtin:tiny-gemma
    data:
      conversations:
        - - {role: user, content: a}
          - {role: assistant, content: b}
    expect:
      - prompt: a
        equals: b
"""

BOOM_PLUGIN = """\
from sft_spec import hookimpl


@hookimpl(tryfirst=True)
def sft_spec_load_model(item, config):
    if item.name == "boom":
        raise RuntimeError("the model loader exploded")
"""


def _project(tmp_path: Path) -> Path:
    """A project folder with a pytest config at its root, so pytest's ids start at the same folder."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "learn.sft.yaml").write_text(textwrap.dedent(SPEC), encoding="utf-8")
    (specs / "later.sft.yaml").write_text(textwrap.dedent(SKIPPED), encoding="utf-8")
    return tmp_path


def _pytest(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "sft_spec", "-p", "no:cacheprovider", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _verbose_outcomes(output: str) -> dict[str, str]:
    found = re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", output, re.M)
    return dict(found)


def test_pytest_and_sft_spec_agree_on_ids_and_outcomes(tmp_path, monkeypatch, sft):
    project = _project(tmp_path)
    monkeypatch.chdir(project)
    cli = sft("run", "specs", "--no-cache", "-v")
    cli_outcomes = {c.nodeid: c.outcome for r in cli.recorder.reports for c in r.cases}
    assert cli_outcomes == {
        "specs/learn.sft.yaml::learn::expect[0]": "passed",
        "specs/learn.sft.yaml::learn::expect[1]": "failed",
        "specs/learn.sft.yaml::learn::checks[loss_decreased]": "passed",
        "specs/later.sft.yaml::later::expect[0]": "skipped",
    }

    run = _pytest(project, "specs/", "-v", "--junitxml", "junit.xml", "--sft-spec-args=--no-cache")
    assert run.returncode == 1, run.stdout + run.stderr
    outcomes = {k: v.lower() for k, v in _verbose_outcomes(run.stdout).items()}
    assert outcomes == cli_outcomes, run.stdout
    # The failure reads as in the terminal reporter: the same diff line, no Python traceback.
    diff = next(line for line in cli.out.splitlines() if line.startswith("diff:"))
    assert diff in run.stdout
    assert "Traceback" not in run.stdout
    assert "DeprecationWarning" not in run.stdout  # torch's own, raised inside torch: not the user's
    assert re.search(r"^FAILED specs/learn.sft.yaml::learn::expect\[1\] - .*equals: expected", run.stdout, re.M)
    cases = ET.parse(project / "junit.xml").getroot().iter("testcase")
    assert sorted(c.get("name") for c in cases) == ["checks[loss_decreased]", "expect[0]", "expect[0]", "expect[1]"]


def test_collect_only_ids_k_and_m_match_sft_spec(tmp_path, monkeypatch, sft):
    project = _project(tmp_path)
    monkeypatch.chdir(project)
    # (sft-spec's -k keeps the training checks of a selected spec: "-k later" avoids that difference.)
    for selection in ([], ["-m", "smoke"], ["-k", "later"]):
        cli = sft("run", "specs", "--co", "-q", *selection)
        cli_ids = [line for line in cli.out.splitlines() if "::" in line]
        run = _pytest(project, "specs/", "--co", "-q", *selection)
        ids = [line for line in run.stdout.splitlines() if "::" in line]
        assert ids == cli_ids and ids, (selection, run.stdout)
    assert cli_ids == ["specs/later.sft.yaml::later::expect[0]"]


def test_spec_errors_are_located_without_traceback(tmp_path):
    project = _project(tmp_path)
    (project / "boom.py").write_text(BOOM_PLUGIN, encoding="utf-8")
    text = textwrap.dedent(SKIPPED).replace("skip: not today\n", "")
    (project / "specs" / "boom.sft.yaml").write_text(text, encoding="utf-8")
    run = _pytest(project, "specs/boom.sft.yaml", "--sft-spec-args=-p boom --no-cache")
    assert "ERROR at setup of boom::expect[0]" in run.stdout
    assert "RuntimeError: the model loader exploded" in run.stdout
    assert "Traceback" not in run.stdout

    (project / "specs" / "broken.sft.yaml").write_text("model: builtin:tiny-gemma\nmodle: x\n", encoding="utf-8")
    (project / "specs" / "skipped.sft.yaml").write_text(textwrap.dedent(SKIPPED), encoding="utf-8")
    run = _pytest(project, "specs/broken.sft.yaml", "specs/skipped.sft.yaml", "-rA")
    # As in `sft-spec run`: the broken file is an error of its own, and the other specs still run.
    assert run.returncode == 1, run.stdout
    assert "ERROR at setup of collect" in run.stdout and "1 skipped, 1 error" in run.stdout
    assert "specs/broken.sft.yaml:2:1: modle: unknown key 'modle'. Did you mean: model?" in run.stdout
    assert "Traceback" not in run.stdout


def test_a_broken_plugin_is_an_error_and_the_specs_still_run(tmp_path):
    project = _project(tmp_path)
    (project / "badimp.py").write_text("raise RuntimeError('broken at import')\n", encoding="utf-8")
    (project / "specs" / "skipped.sft.yaml").write_text(textwrap.dedent(SKIPPED), encoding="utf-8")
    run = _pytest(project, "specs/", "--sft-spec-args=-p badimp")
    assert run.returncode == 1, run.stdout
    assert "plugin 'badimp' is broken: cannot be imported: RuntimeError: broken at import" in run.stdout
    assert re.search(r"\d+ passed, .*\d+ skipped, .*1 error in", run.stdout), run.stdout


def test_control_characters_in_a_spec_name_are_escaped_in_pytests_output(tmp_path):
    project = _project(tmp_path)
    text = textwrap.dedent(SKIPPED).replace("skip: not today\n", "") + 'name: "n\\e[2K\\rALL PASSED\\a"\n'
    text = text.replace("equals: b", "equals: not what a random model says")
    (project / "specs" / "evil.sft.yaml").write_text(text, encoding="utf-8")
    run = _pytest(project, "specs/", "--co", "-q")
    run_failed = _pytest(project, "specs/", "--sft-spec-args=--no-cache", "-rA")
    for output in (run.stdout, run_failed.stdout):
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f]", output), output
    assert r"n\x1b[2K\rALL PASSED\x07::expect[0]" in run.stdout


def test_plain_pytest_in_the_repo_collects_only_tests():
    """tests/bad_specs holds broken specs on purpose: a plain `pytest` must not collect them."""
    env = {**os.environ}
    run = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    ids = [line for line in run.stdout.splitlines() if "::" in line]
    assert ids and all(i.startswith("tests/") and i.split("::")[0].endswith(".py") for i in ids), run.stdout[-2000:]


def test_spec_files_need_an_explicit_path_or_the_ini_option(tmp_path):
    project = _project(tmp_path)
    plain = _pytest(project, "--co", "-q")
    assert plain.returncode == 5 and "::" not in plain.stdout, plain.stdout
    (project / "pytest.ini").write_text("[pytest]\nsft_spec_collect = true\n", encoding="utf-8")
    listed = _pytest(project, "--co", "-q").stdout
    assert "specs/learn.sft.yaml::learn::expect[0]" in listed


def test_expectation_xfail_becomes_pytests_xfail_mark(tmp_path):
    from conftest import XFAIL_CHECKS

    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    strict = XFAIL_CHECKS.replace("xfail: true", "xfail: {reason: learnt too well, strict: true}")
    (tmp_path / "probe.sft.yaml").write_text(textwrap.dedent(strict), encoding="utf-8")
    run = _pytest(tmp_path, "probe.sft.yaml", "-v", "-rxX", "--sft-spec-args=--no-cache")
    outcomes = _verbose_outcomes(run.stdout)
    assert outcomes == {"probe.sft.yaml::probe::expect[0]": "PASSED", "probe.sft.yaml::probe::expect[1]": "XFAIL",
                        "probe.sft.yaml::probe::expect[2]": "FAILED"}, run.stdout
    assert "[XPASS(strict)] learnt too well" in run.stdout
    assert "XFAIL probe.sft.yaml::probe::expect[1] - a probe we know fails" in run.stdout
    assert run.returncode == 1


def test_pytest_and_the_cli_share_cached_results(tmp_path, monkeypatch, sft):
    # The key held the CLI's terminal reporter, which pytest does not load: each retrained the other's specs.
    project = _project(tmp_path)
    monkeypatch.setenv("SFT_SPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(project)
    run = _pytest(project, "specs/learn.sft.yaml")
    assert run.returncode == 1, run.stdout + run.stderr  # expect[1] fails, as written
    cli = sft("run", "specs/learn.sft.yaml")
    assert cli.recorder.reports[0].cached, cli.out


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


def test_a_misspelled_hook_registered_at_configure_is_an_error_under_pytest(tmp_path):
    # The CLI checked hook names after configure (pluggy's check_pending); `pytest specs/` did not, so a
    # reporter with a typo was silently never called. One session lifecycle now checks it everywhere.
    project = _project(tmp_path)
    (project / "misspelled.py").write_text(MISSPELLED_AT_CONFIGURE.format(roles='("main", "worker")'),
                                           encoding="utf-8")
    run = _pytest(project, "specs/later.sft.yaml", "--sft-spec-args=-p misspelled")
    assert run.returncode != 0, run.stdout
    assert "sft_spec_log_reprot" in run.stdout + run.stderr, run.stdout + run.stderr


def test_a_misspelled_hook_registered_in_a_worker_is_an_error_under_n(tmp_path, monkeypatch, sft):
    project = _project(tmp_path)
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
    project = _project(tmp_path)
    run = _pytest(project, "specs/later.sft.yaml", "--sft-spec-json", "r.json", "--sft-spec-no-cache", "-rs")
    assert (project / "r.json").is_file(), run.stdout + run.stderr  # a skipped spec is reported, as by the CLI
    assert "SKIPPED [1] specs/later.sft.yaml:8: not today" in run.stdout, run.stdout  # at the case
    (skipped,) = json.loads((project / "r.json").read_text(encoding="utf-8"))["specs"]
    assert skipped["outcome"] == "skipped" and skipped["skip_reason"] == "not today"
    run = _pytest(project, "specs/later.sft.yaml", "--sft-spec-timeout", "soon")
    assert run.returncode != 0 and "--timeout" in run.stdout + run.stderr, run.stdout + run.stderr
    help_text = _pytest(project, "--help").stdout
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
    project = _project(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(project)}  # with xdist's plugin autoloaded
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "specs/",
                          "--sft-spec-json", "r.json"], cwd=project, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 4, run.stdout + run.stderr
    assert "--json writes one file for the whole run" in run.stderr and not (project / "r.json").exists()


def test_a_session_that_could_not_be_configured_runs_no_spec(tmp_path):
    # With --continue-on-collection-errors, the next spec file was collected on the half-built session.
    project = _project(tmp_path)
    (project / "crashcfg.py").write_text("from sft_spec import hookimpl\n\n\n@hookimpl\n"
                                         "def sft_spec_configure(config):\n"
                                         "    raise RuntimeError('configure bug')\n", encoding="utf-8")
    run = _pytest(project, "specs/", "--sft-spec-args=-p crashcfg", "--continue-on-collection-errors", "-rA")
    assert run.returncode != 0, run.stdout
    assert run.stdout.count("configure bug") >= 2, run.stdout  # both files say why
    assert " passed" not in run.stdout.splitlines()[-1] and " skipped" not in run.stdout.splitlines()[-1], run.stdout


def test_a_spec_whose_files_could_not_be_saved_is_an_error_under_pytest(tmp_path):
    # pytest shows the report as logged (persisting is the last step of making it), not the one before.
    project = _project(tmp_path)
    (project / "full_disk.py").write_text("from sft_spec import hookimpl\n\n\n@hookimpl\n"
                                          "def sft_spec_persist_report(report, session):\n"
                                          "    raise OSError('No space left on device')\n", encoding="utf-8")
    run = _pytest(project, "specs/learn.sft.yaml", "-v", "--sft-spec-args=--no-cache -p full_disk")
    assert "could not save the files this spec records" in run.stdout, run.stdout
    assert "PASSED" not in run.stdout and run.returncode == 1, run.stdout
