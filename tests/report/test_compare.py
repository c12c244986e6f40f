"""Reviewing a change: two runs compared (transitions, answer diffs, settings and versions that differ,
exit codes for CI), Markdown summaries, and a history of runs in the HTML report."""

from __future__ import annotations

import json
import os
import re
import textwrap

import pytest
from conftest import GEMMA_ONE_ANSWER

SPEC = GEMMA_ONE_ANSWER.format(method="lora", epochs=8, lr="1.0e-2")
STEADY = """\
    model: builtin:tiny-gemma
    skip: unchanged between the runs
    data:
      conversations:
        - - {role: user, content: a}
          - {role: assistant, content: b}
    expect:
      - {prompt: a, equals: b}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same suite run twice in one folder: BASE as written, HEAD with a learning rate too small to teach."""
    import contextlib
    import io

    from sft_spec.cli import main

    folder = tmp_path_factory.mktemp("runs")
    specs = folder / "specs"
    specs.mkdir()
    (folder / "pyproject.toml").write_text("[project]\nname = 'p'\n", encoding="utf-8")  # the suite's root
    (specs / "steady.sft.yaml").write_text(textwrap.dedent(STEADY), encoding="utf-8")
    recipe = specs / "recipe.sft.yaml"
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for name, lr in (("base", "0.01"), ("head", "1.0e-06")):
            recipe.write_text(textwrap.dedent(SPEC).replace("learning_rate: 1.0e-2", f"learning_rate: {lr}"),
                              encoding="utf-8")
            with contextlib.redirect_stdout(io.StringIO()):
                main(["run", "specs", "--no-cache", "--json", f"{name}.json", "--history", "history",
                      *(["--md", "head.md", "--base", "base.json"] if name == "head" else [])])
    finally:
        os.chdir(cwd)
    return folder


def compare(sft, folder, *args):
    return sft("compare", folder / "base.json", folder / "head.json", *args)


def test_a_change_that_breaks_a_recipe_is_named_with_its_transition_diff_and_setting(runs, sft):
    result = compare(sft, runs, "--fail-on-regression")
    assert result.code == 1, result.out
    out = result.out
    assert "specs/recipe.sft.yaml::recipe: passed -> failed (REGRESSION)" in out
    assert "    expect[0]: passed -> failed" in out
    assert "        answer: 我学会了 -> " in out and "diff:   [-我学会了-]" in out
    assert "settings: training.learning_rate 0.01 -> 1e-06" in out
    assert "final_loss " in out and "steady" not in out  # unchanged specs are left out unless -v
    assert "1 regressed, 0 fixed, 0 changed, 0 new, 0 removed, 1 unchanged" in out
    assert compare(sft, runs).code == 0  # reported, but only --fail-on-regression fails


def test_nothing_regressed_exits_0(runs, sft):
    result = sft("compare", runs / "base.json", runs / "base.json", "--fail-on-regression")
    assert result.code == 0 and "0 regressed" in result.out


def test_different_library_versions_are_named_as_the_likely_cause(runs, sft, tmp_path):
    doc = json.loads((runs / "head.json").read_text(encoding="utf-8"))
    doc["environment"]["packages"]["trl"] = "1.17.0"
    (tmp_path / "head.json").write_text(json.dumps(doc), encoding="utf-8")
    result = sft("compare", runs / "base.json", tmp_path / "head.json")
    trl = json.loads((runs / "base.json").read_text())["environment"]["packages"]["trl"]
    assert f"library versions differ (a likely cause of what changed): trl {trl} -> 1.17.0" in result.out


def test_a_metric_past_its_tolerance_is_a_regression(runs, sft, tmp_path):
    doc = json.loads((runs / "base.json").read_text(encoding="utf-8"))
    recipe = next(s for s in doc["specs"] if s["name"] == "recipe")
    recipe["metrics"]["final_loss"] += 0.5
    (tmp_path / "worse.json").write_text(json.dumps(doc), encoding="utf-8")
    loose = sft("compare", runs / "base.json", tmp_path / "worse.json", "--fail-on-regression",
                "--tolerance", "final_loss=1.0")
    strict = sft("compare", runs / "base.json", tmp_path / "worse.json", "--fail-on-regression",
                 "--tolerance", "final_loss=0.1")
    assert loose.code == 0 and strict.code == 1
    assert "final_loss" in strict.out and "WORSE (beyond the margin 0.1" in strict.out
    assert sft("compare", runs / "base.json", tmp_path / "worse.json", "--tolerance", "x").code == 4


@pytest.mark.parametrize("doc,message", [
    ({"schema_version": 0, "specs": []}, "schema_version 0 is not supported (this sft-spec reads versions 1, 2)"),
    ({"specs": []}, "not an sft-spec results file (no schema_version)"),
    ("[1, 2", "not a results file"),
])
def test_results_of_another_schema_are_refused_with_a_clear_message(runs, sft, tmp_path, doc, message):
    (tmp_path / "old.json").write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    result = sft("compare", tmp_path / "old.json", runs / "head.json")
    assert result.code == 4 and message in result.err, result.err


def test_comparison_html_and_markdown_escape_what_the_runs_hold(runs, sft, tmp_path):
    doc = json.loads((runs / "head.json").read_text(encoding="utf-8"))
    case = next(s for s in doc["specs"] if s["name"] == "recipe")["expectations"][0]
    case["answer"] = "<img src=x onerror=alert(1)>|`x`\x1b[2K"
    (tmp_path / "head.json").write_text(json.dumps(doc), encoding="utf-8")
    result = sft("compare", runs / "base.json", tmp_path / "head.json", "--html", tmp_path / "c.html",
                 "--md", tmp_path / "c.md")
    html = (tmp_path / "c.html").read_text(encoding="utf-8")
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html and "\x1b" not in html
    assert "default-src 'none'" in html and 'data-transition="regressed"' in html
    assert re.search(r"<h1>sft-spec compare: \d+ specs? regressed \(\d+ findings? counted by the gate\)</h1>", html)
    md = (tmp_path / "c.md").read_text(encoding="utf-8")
    assert "\x1b" not in md and r"\x1b[2K" in md and "<img" not in md.split("```")[0]
    assert "\x1b" not in result.out


def test_the_run_writes_a_markdown_summary_with_the_comparison(runs):
    md = (runs / "head.md").read_text(encoding="utf-8")
    assert md.startswith("## sft-spec: failed")
    assert "| specs/recipe.sft.yaml::recipe | failed | 0/1 |" in md
    assert "expected: 我学会了" in md  # the failure with its diff
    # The title counts specs, as the counts beside it do; the gate's findings in brackets.
    assert "### sft-spec compare: 1 spec regressed (2 findings counted by the gate)" in md
    assert "training.learning_rate 0.01 -> 1e-06" in md
    assert "final\\_loss 0.491 -&gt; 8.551" in md or "final_loss: " in md  # the loss's rise, counted


def test_github_summary_appends_to_the_step_summary(sft, write_spec, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = sft("run", write_spec("s.sft.yaml", STEADY), "--github-summary")
    assert result.code == 0
    text = summary.read_text(encoding="utf-8")
    assert text.startswith("earlier step\n## sft-spec: passed") and "1 skipped" in text
    monkeypatch.delenv("GITHUB_STEP_SUMMARY")
    assert sft("run", write_spec("t.sft.yaml", STEADY), "--github-summary").code == 4


def test_history_keeps_each_run_and_the_html_shows_the_trend(runs, sft, tmp_path):
    entries = sorted((runs / "history").glob("*.json"))
    assert len(entries) == 2
    (runs / "history" / "99999999T999999-1.json").write_text('{"history_version": 1, "specs": {', encoding="utf-8")
    html = tmp_path / "r.html"
    result = sft("report", runs / "head.json", "--html", html, "--history", runs / "history")
    assert result.code == 0
    text = html.read_text(encoding="utf-8")
    assert text.count('class="dot o-passed"') >= 2 and 'class="dot o-failed"' in text  # the recipe: passed, failed
    assert "history: skipped 99999999T999999-1.json: not readable JSON" in text
    assert "<h3>last runs" in text


def test_a_spec_that_errors_in_head_is_a_regression(runs, sft, tmp_path):
    doc = json.loads((runs / "base.json").read_text(encoding="utf-8"))
    recipe = next(s for s in doc["specs"] if s["name"] == "recipe")
    recipe.update(outcome="error", expectations=[], training_checks=[],
                  error={"message": "TemplateError: System role not supported", "location": "specs/recipe.sft.yaml:1",
                         "phase": "format", "plugin": "", "traceback": "", "kind": "error"})
    (tmp_path / "head.json").write_text(json.dumps(doc), encoding="utf-8")
    result = sft("compare", runs / "base.json", tmp_path / "head.json", "--fail-on-regression",
                 "--md", tmp_path / "m.md")
    assert result.code == 1, result.out
    headline = "1 spec regressed (1 finding counted by the gate)"
    assert "expect[0]: passed -> error" in result.out and headline in result.out
    assert (tmp_path / "m.md").read_text(encoding="utf-8").startswith(f"## sft-spec compare: {headline}")


def test_learning_later_is_the_regression_not_learning_sooner(runs, sft, tmp_path):
    doc = json.loads((runs / "base.json").read_text(encoding="utf-8"))
    recipe = next(s for s in doc["specs"] if s["name"] == "recipe")
    for step, name in ((12, "soon.json"), (25, "late.json")):
        recipe["metrics"]["learnt_at_step"] = step
        (tmp_path / name).write_text(json.dumps(doc), encoding="utf-8")
    args = ("--fail-on-regression", "--tolerance", "learnt_at_step=5")
    assert sft("compare", tmp_path / "soon.json", tmp_path / "late.json", *args).code == 1
    assert sft("compare", tmp_path / "late.json", tmp_path / "soon.json", *args).code == 0


def test_a_malformed_results_file_is_a_usage_error_not_a_crash(runs, sft, tmp_path):
    doc = json.loads((runs / "base.json").read_text(encoding="utf-8"))
    doc["specs"][0]["metrics"] = None
    (tmp_path / "bad.json").write_text(json.dumps(doc), encoding="utf-8")
    result = sft("compare", tmp_path / "bad.json", runs / "head.json")
    assert result.code == 4 and "malformed results file at $.specs[0].metrics: None is not of type" in result.err


def test_a_foreign_base_file_stops_the_run_before_anything_trains(sft, write_spec, tmp_path):
    (tmp_path / "foreign.json").write_text('{"schema_version": 999, "specs": []}', encoding="utf-8")
    result = sft("run", write_spec("s.sft.yaml", STEADY), "--md", tmp_path / "m.md",
                 "--base", tmp_path / "foreign.json")
    assert result.code == 4 and "schema_version 999 is not supported" in result.err
    assert result.recorder.reports == []


@pytest.mark.parametrize("entry", [
    {"history_version": 1, "specs": {"x": {"outcome": "passed", "final_loss": "abc"}}},
    {"history_version": 1, "specs": {"x": {"outcome": "passed", "metrics": [1, 2]}}},
    {"history_version": 1, "specs": {"x": {"outcome": "passed", "metrics": {"a": "zz"}}}},
])
def test_a_history_entry_of_the_wrong_shape_is_skipped(sft, write_spec, tmp_path, entry):
    history = tmp_path / "history"
    history.mkdir()
    (history / "0-bad.json").write_text(json.dumps(entry), encoding="utf-8")
    result = sft("run", write_spec("s.sft.yaml", STEADY), "--history", history, "--html", tmp_path / "r.html")
    assert result.code == 0, result.out + result.err
    assert "history: skipped 0-bad.json: not a history entry of this sft-spec" in result.out
