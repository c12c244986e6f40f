"""The pytest plugin: `pytest specs/` and `sft-spec run specs/` collect the same ids and agree on outcomes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

from pytest_projects import BOOM_PLUGIN, REPO, SKIPPED, make_project, run_pytest, verbose_outcomes


def test_pytest_and_sft_spec_agree_on_ids_and_outcomes(tmp_path, monkeypatch, sft):
    project = make_project(tmp_path)
    monkeypatch.chdir(project)
    cli = sft("run", "specs", "--no-cache", "-v")
    cli_outcomes = {c.nodeid: c.outcome for r in cli.recorder.reports for c in r.cases}
    assert cli_outcomes == {
        "specs/learn.sft.yaml::learn::expect[0]": "passed",
        "specs/learn.sft.yaml::learn::expect[1]": "failed",
        "specs/learn.sft.yaml::learn::checks[loss_decreased]": "passed",
        "specs/later.sft.yaml::later::expect[0]": "skipped",
    }

    run = run_pytest(project, "specs/", "-v", "--junitxml", "junit.xml", "--sft-spec-args=--no-cache")
    assert run.returncode == 1, run.stdout + run.stderr
    outcomes = {k: v.lower() for k, v in verbose_outcomes(run.stdout).items()}
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
    project = make_project(tmp_path)
    monkeypatch.chdir(project)
    # (sft-spec's -k keeps the training checks of a selected spec: "-k later" avoids that difference.)
    for selection in ([], ["-m", "smoke"], ["-k", "later"]):
        cli = sft("run", "specs", "--co", "-q", *selection)
        cli_ids = [line for line in cli.out.splitlines() if "::" in line]
        run = run_pytest(project, "specs/", "--co", "-q", *selection)
        ids = [line for line in run.stdout.splitlines() if "::" in line]
        assert ids == cli_ids and ids, (selection, run.stdout)
    assert cli_ids == ["specs/later.sft.yaml::later::expect[0]"]


def test_spec_errors_are_located_without_traceback(tmp_path):
    project = make_project(tmp_path)
    (project / "boom.py").write_text(BOOM_PLUGIN, encoding="utf-8")
    text = textwrap.dedent(SKIPPED).replace("skip: not today\n", "")
    (project / "specs" / "boom.sft.yaml").write_text(text, encoding="utf-8")
    run = run_pytest(project, "specs/boom.sft.yaml", "--sft-spec-args=-p boom --no-cache")
    assert "ERROR at setup of boom::expect[0]" in run.stdout
    assert "RuntimeError: the model loader exploded" in run.stdout
    assert "Traceback" not in run.stdout

    (project / "specs" / "broken.sft.yaml").write_text("model: builtin:tiny-gemma\nmodle: x\n", encoding="utf-8")
    (project / "specs" / "skipped.sft.yaml").write_text(textwrap.dedent(SKIPPED), encoding="utf-8")
    run = run_pytest(project, "specs/broken.sft.yaml", "specs/skipped.sft.yaml", "-rA")
    # As in `sft-spec run`: the broken file is an error of its own, and the other specs still run.
    assert run.returncode == 1, run.stdout
    assert "ERROR at setup of collect" in run.stdout and "1 skipped, 1 error" in run.stdout
    assert "specs/broken.sft.yaml:2:1: modle: unknown key 'modle'. Did you mean: model?" in run.stdout
    assert "Traceback" not in run.stdout


def test_a_broken_plugin_is_an_error_and_the_specs_still_run(tmp_path):
    project = make_project(tmp_path)
    (project / "badimp.py").write_text("raise RuntimeError('broken at import')\n", encoding="utf-8")
    (project / "specs" / "skipped.sft.yaml").write_text(textwrap.dedent(SKIPPED), encoding="utf-8")
    run = run_pytest(project, "specs/", "--sft-spec-args=-p badimp")
    assert run.returncode == 1, run.stdout
    assert "plugin 'badimp' is broken: cannot be imported: RuntimeError: broken at import" in run.stdout
    assert re.search(r"\d+ passed, .*\d+ skipped, .*1 error in", run.stdout), run.stdout


def test_control_characters_in_a_spec_name_are_escaped_in_pytests_output(tmp_path):
    project = make_project(tmp_path)
    text = textwrap.dedent(SKIPPED).replace("skip: not today\n", "") + 'name: "n\\e[2K\\rALL PASSED\\a"\n'
    text = text.replace("equals: b", "equals: not what a random model says")
    (project / "specs" / "evil.sft.yaml").write_text(text, encoding="utf-8")
    run = run_pytest(project, "specs/", "--co", "-q")
    run_failed = run_pytest(project, "specs/", "--sft-spec-args=--no-cache", "-rA")
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


def test_expectation_xfail_becomes_pytests_xfail_mark(tmp_path):
    from conftest import XFAIL_CHECKS

    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    strict = XFAIL_CHECKS.replace("xfail: true", "xfail: {reason: learnt too well, strict: true}")
    (tmp_path / "probe.sft.yaml").write_text(textwrap.dedent(strict), encoding="utf-8")
    run = run_pytest(tmp_path, "probe.sft.yaml", "-v", "-rxX", "--sft-spec-args=--no-cache")
    outcomes = verbose_outcomes(run.stdout)
    assert outcomes == {"probe.sft.yaml::probe::expect[0]": "PASSED", "probe.sft.yaml::probe::expect[1]": "XFAIL",
                        "probe.sft.yaml::probe::expect[2]": "FAILED"}, run.stdout
    assert "[XPASS(strict)] learnt too well" in run.stdout
    assert "XFAIL probe.sft.yaml::probe::expect[1] - a probe we know fails" in run.stdout
    assert run.returncode == 1


def test_pytest_and_the_cli_share_cached_results(tmp_path, monkeypatch, sft):
    # The key held the CLI's terminal reporter, which pytest does not load: each retrained the other's specs.
    project = make_project(tmp_path)
    monkeypatch.setenv("SFT_SPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(project)
    run = run_pytest(project, "specs/learn.sft.yaml")
    assert run.returncode == 1, run.stdout + run.stderr  # expect[1] fails, as written
    cli = sft("run", "specs/learn.sft.yaml")
    assert cli.recorder.reports[0].cached, cli.out
