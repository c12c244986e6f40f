"""Reviewing a change: specs match across checkouts, a deleted or muted check fails the gate unless allowed,
the git commit is in the results and history, a cached rerun is not a new run, and a results file cannot name
one spec twice."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

SPEC = """\
model: builtin:tiny-gemma
training: {num_train_epochs: 2, learning_rate: 1.0e-2}
data:
  conversations:
    - - {role: user, content: 微调测试}
      - {role: assistant, content: 我学会了}
checks: {loss_decreased: true}
"""


@pytest.fixture(scope="module")
def checkouts(tmp_path_factory):
    """One project in two folders (main/ and pr/, each a git checkout), each run from their common parent."""
    import contextlib
    import io

    from sft_spec.cli import main

    root = tmp_path_factory.mktemp("checkouts")
    for name in ("main", "pr"):
        specs = root / name / "specs"
        specs.mkdir(parents=True)
        (root / name / "pyproject.toml").write_text("[project]\nname = 'p'\n", encoding="utf-8")
        for spec in ("a", "b"):
            (specs / f"{spec}.sft.yaml").write_text(textwrap.dedent(SPEC), encoding="utf-8")
        env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t"}
        for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"]):
            subprocess.run(["git", "-C", str(root / name), *args], check=True, env=env, capture_output=True)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for name in ("main", "pr"):
            with contextlib.redirect_stdout(io.StringIO()):
                main(["run", f"{name}/specs", "--no-cache", "--json", f"{name}.json"])
    finally:
        os.chdir(cwd)
    return root


def test_specs_run_from_two_checkouts_match_by_their_id_under_the_root(checkouts, sft):
    main_doc = json.loads((checkouts / "main.json").read_text(encoding="utf-8"))
    assert [s["nodeid"] for s in main_doc["specs"]] == ["specs/a.sft.yaml::a", "specs/b.sft.yaml::b"]
    result = sft("compare", checkouts / "main.json", checkouts / "pr.json", "--fail-on-regression", "-v")
    assert result.code == 0, result.out
    assert "0 new, 0 removed" in result.out and "note: only" not in result.out


def test_results_carry_the_git_commit_and_compare_names_it(checkouts, sft):
    doc = json.loads((checkouts / "main.json").read_text(encoding="utf-8"))
    commit = subprocess.run(["git", "-C", str(checkouts / "main"), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    assert doc["git"] == {"commit": commit, "dirty": False}
    result = sft("compare", checkouts / "main.json", checkouts / "pr.json")
    assert f"(commit {commit[:10]})" in result.out


def _edited(checkouts: Path, tmp_path: Path, edit) -> Path:
    doc = json.loads((checkouts / "pr.json").read_text(encoding="utf-8"))
    edit(doc)
    path = tmp_path / "head.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@pytest.mark.parametrize("edit,shown", [
    (lambda d: d["specs"].pop(0), "specs/a.sft.yaml::a: passed -> removed"),
    (lambda d: d["specs"][0].update(outcome="skipped"), "specs/a.sft.yaml::a: passed -> skipped (its checks no "
                                                        "longer run)"),
    (lambda d: d.update(specs=[]), "specs/a.sft.yaml::a: passed -> removed"),
    (lambda d: d["specs"][0].update(outcome="xfailed"), "specs/a.sft.yaml::a: passed -> xfailed (now expected to "
                                                        "fail)"),
])
def test_a_check_that_passed_and_is_gone_or_muted_in_head_fails_the_gate_unless_allowed(checkouts, sft, tmp_path,
                                                                                         edit, shown):
    head = _edited(checkouts, tmp_path, edit)
    result = sft("compare", checkouts / "main.json", head, "--fail-on-regression", "--md", tmp_path / "c.md")
    assert result.code == 1, result.out
    assert shown in result.out and "--allow-removed specs/a.sft.yaml::a if on purpose" in result.out
    lines = [line for line in result.out.splitlines() if "::" in line and not line.startswith(("BASE", "HEAD"))]
    assert lines[0].startswith("specs/a.sft.yaml::a: passed ->")  # the removal first
    assert "allow-removed" in (tmp_path / "c.md").read_text(encoding="utf-8")
    allowed = sft("compare", checkouts / "main.json", head, "--fail-on-regression", "--allow-removed", "specs/a*",
                  "--allow-removed", "specs/b.sft.yaml::b")
    assert allowed.code == 0, allowed.out


def test_a_failing_spec_deleted_in_head_hides_its_failure_and_fails_the_gate(checkouts, sft, tmp_path):
    doc = json.loads((checkouts / "main.json").read_text(encoding="utf-8"))
    doc["specs"][0]["outcome"] = "failed"
    (tmp_path / "base.json").write_text(json.dumps(doc), encoding="utf-8")
    head = _edited(checkouts, tmp_path, lambda d: d["specs"].pop(0))
    result = sft("compare", tmp_path / "base.json", head, "--fail-on-regression")
    assert result.code == 1 and "failed -> removed (it failed in BASE: the failure is hidden" in result.out


def test_a_failing_spec_renamed_in_head_is_a_regression(checkouts, sft, tmp_path):
    def rename(doc):
        spec = doc["specs"][0]
        spec.update(nodeid="specs/a2.sft.yaml::a2", outcome="failed")

    head = _edited(checkouts, tmp_path, rename)
    result = sft("compare", checkouts / "main.json", head, "--fail-on-regression",
                 "--allow-removed", "specs/a.sft.yaml::a")
    assert result.code == 1 and "specs/a2.sft.yaml::a2: new in HEAD, and failed" in result.out


def test_when_few_specs_match_compare_says_why(checkouts, sft, tmp_path):
    def other_ids(doc):
        for spec in doc["specs"]:
            spec["nodeid"] = "pr/" + spec["nodeid"]

    head = _edited(checkouts, tmp_path, other_ids)
    result = sft("compare", checkouts / "main.json", head)
    assert "note: only 0 of BASE's 2 specs are in HEAD" in result.out


def test_a_results_file_that_names_one_spec_twice_is_refused(checkouts, sft, tmp_path):
    head = _edited(checkouts, tmp_path, lambda d: d["specs"].append(d["specs"][0]))
    result = sft("compare", checkouts / "main.json", head)
    assert result.code == 4 and "have the same id 'specs/a.sft.yaml::a'" in result.err


def test_a_cached_rerun_is_not_a_new_run_in_the_history(tmp_path, sft, monkeypatch):
    from sft_spec_plugins.report.history import read_history

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SFT_SPEC_CACHE", str(tmp_path / "cache"))
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'p'\n", encoding="utf-8")
    (tmp_path / "a.sft.yaml").write_text(textwrap.dedent(SPEC), encoding="utf-8")
    for _ in range(2):
        assert sft("run", "a.sft.yaml", "--history", "history").code == 0
    history = read_history(tmp_path / "history")
    assert len(history.entries) == 2
    assert [e["specs"]["a.sft.yaml::a"]["cached"] for e in history.entries] == [False, True]
    assert len(history.trend("a.sft.yaml::a")) == 1
    shutil.rmtree(tmp_path / "cache")


TEMPLATE_SPEC = """\
model: builtin:tiny-gemma
training: {{num_train_epochs: 2, learning_rate: 1.0e-2}}
format:
  template: |
    {{{{ bos_token }}}}{{% for m in messages %}}{{% if m['role'] == 'user' %}}<start_of_turn>user
    {{{{ m['content'] }}}}<end_of_turn>
    {{% else %}}<start_of_turn>model
    {{{{ m['content'] }}}}{end}
    {{% endif %}}{{% endfor %}}{{% if add_generation_prompt %}}<start_of_turn>model
    {{% endif %}}
data:
  conversations:
    - - {{role: user, content: 微调测试}}
      - {{role: assistant, content: 我学会了}}
checks: {{loss_decreased: true}}
"""


def test_a_template_that_stops_training_the_end_of_turn_is_named_as_a_mask_change_everywhere(tmp_path, sft,
                                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'p'\n", encoding="utf-8")
    for name, end in (("base", "<end_of_turn>"), ("head", "")):
        (tmp_path / "t.sft.yaml").write_text(TEMPLATE_SPEC.format(end=end), encoding="utf-8")
        assert sft("run", "t.sft.yaml", "--no-cache", "--json", f"{name}.json").code == 0
    result = sft("compare", "base.json", "head.json", "--md", "c.md", "--html", "c.html", "--json", "c.json")
    expected = "likely cause: the loss mask changed: 1 of the first 1 training conversations differ"
    assert expected in result.out and "the rendered text changed too" in result.out, result.out
    assert "⟦我学会了[-<end_of_turn>-]" in result.out
    assert "trained text: '我学会了<end_of_turn>\\n<eos>' -> '我学会了\\n<eos>'" in result.out
    import html

    assert expected in (tmp_path / "c.md").read_text(encoding="utf-8")
    assert html.escape(expected, quote=False) in (tmp_path / "c.html").read_text(encoding="utf-8")
    assert expected in (tmp_path / "c.json").read_text(encoding="utf-8")


def test_the_recipes_cost_is_named_and_gates_only_with_a_tolerance_of_its_own(checkouts, sft, tmp_path):
    doc = json.loads((checkouts / "main.json").read_text(encoding="utf-8"))
    metrics = doc["specs"][0]["metrics"]
    assert metrics["train_tokens"] > 0 and metrics["train_tokens_per_second"] > 0 and metrics["peak_memory_mb"] > 0
    assert metrics["peak_memory_kind"] == "process peak RSS"

    def slower(d):
        d["specs"][0]["metrics"].update(train_tokens_per_second=metrics["train_tokens_per_second"] * 0.6,
                                        peak_memory_mb=metrics["peak_memory_mb"] * 2)

    head = _edited(checkouts, tmp_path, slower)
    named = sft("compare", checkouts / "main.json", head, "--fail-on-regression")
    assert "train_tokens_per_second: " in named.out and "peak_memory_mb: " in named.out, named.out
    assert named.code == 0  # wall time moves on shared machines: named, not counted, by default
    gated = sft("compare", checkouts / "main.json", head, "--fail-on-regression",
                "--tolerance", "train_tokens_per_second=30%", "--tolerance", "peak_memory_mb=50%")
    assert gated.code == 1 and gated.out.count("WORSE") >= 2, gated.out


def test_markdown_from_results_files_and_names_links_nothing_and_renders_no_html(checkouts, sft, tmp_path):
    from sft_spec_plugins.common.escape import md_text

    shown = md_text("@team see https://evil.example www.evil.example #123 <img src=x>")
    for raw in ("@team", "https://", "www.evil", "#123", "<img"):
        assert raw not in shown, shown

    def hostile(doc):
        doc["specs"][0]["nodeid"] = "specs/a.sft.yaml::@team https://evil.example <img src=x.png>"

    head = _edited(checkouts, tmp_path, hostile)
    sft("compare", checkouts / "main.json", head, "--md", tmp_path / "c.md")
    md = (tmp_path / "c.md").read_text(encoding="utf-8")
    assert "evil" in md  # the hostile id is shown, as text
    outside_code = "".join(md.split("```")[::2])
    assert "<img" not in outside_code and "@team" not in outside_code and "https://evil" not in outside_code

    # A value the schema names is checked before anything renders it: a forged outcome is refused where it is.
    forged = _edited(checkouts, tmp_path, lambda d: d["specs"][0].update(outcome="<img src=x>"))
    refused = sft("compare", checkouts / "main.json", forged, "--md", tmp_path / "d.md")
    assert refused.code == 4 and "malformed results file at $.specs[0].outcome" in refused.out + refused.err
    assert not (tmp_path / "d.md").exists()


@pytest.mark.parametrize("name", ["x]::expect[0", "", "a b", "é/x"])
def test_an_eval_set_name_that_could_forge_a_test_id_is_a_located_error(tmp_path, sft, name):
    path = tmp_path / "s.sft.yaml"
    path.write_text(textwrap.dedent(SPEC) + f"eval:\n  {json.dumps(name)}:\n    rows: [{{prompt: a}}]\n"
                    "    checks: {not_equals: b}\n", encoding="utf-8")
    result = sft("validate", path)
    assert result.code == 1 and "s.sft.yaml:" in result.out and "eval set name" in result.out, result.out


def _deep(levels: int):
    value: object = 1
    for _ in range(levels):
        value = {"x": value}
    return value


@pytest.mark.parametrize("edit,where", [
    (lambda d: d["specs"][0]["metrics"].update(final_loss=10 ** 400), "not a results file"),
    (lambda d: d["specs"][0].update(duration=10 ** 400), "not a results file"),
    (lambda d: d["specs"][0]["training_checks"][0]["checks"][0].update(score="abc"), "$.specs[0].training_checks[0]"),
    (lambda d: d["specs"][0]["settings"].update(training=[1]), "$.specs[0].settings.training"),
    (lambda d: d["specs"][0]["extra"].update(seeds=[{"seed": 1, "cases": {"x": ["passed"]}}]), "$.specs[0].extra"),
    (lambda d: d["specs"][0]["settings"].update(x=_deep(100)), "nested deeper than 64 levels"),
])
def test_a_schema_valid_looking_results_file_that_would_crash_a_reader_is_refused(checkouts, sft, tmp_path, edit,
                                                                                 where):
    head = _edited(checkouts, tmp_path, edit)
    for args in (("compare", checkouts / "main.json", head), ("report", head, "--html", tmp_path / "r.html")):
        result = sft(*args)
        assert result.code == 4 and where in result.out + result.err, (args, result.out + result.err)


def test_a_number_spelled_past_a_float_is_refused(checkouts, sft, tmp_path):
    text = (checkouts / "pr.json").read_text(encoding="utf-8")
    doc = json.loads(text)
    doc["specs"][0]["duration"] = 12345.5
    (tmp_path / "inf.json").write_text(json.dumps(doc).replace("12345.5", "1e999"), encoding="utf-8")
    result = sft("report", tmp_path / "inf.json", "--html", tmp_path / "r.html")
    assert result.code == 4 and "1e999 is not a finite number" in result.err, result.err


def test_a_seed_entry_with_only_its_seed_renders(checkouts, sft, tmp_path):
    head = _edited(checkouts, tmp_path, lambda d: d["specs"][0]["extra"].update(seeds=[{"seed": 1}]))
    assert sft("report", head, "--html", tmp_path / "r.html").code == 0


def test_a_history_entry_nested_too_deep_is_a_warning(checkouts, sft, tmp_path):
    history = tmp_path / "history"
    history.mkdir()
    (history / "2026.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    result = sft("report", checkouts / "pr.json", "--history", history, "--html", tmp_path / "r.html")
    assert result.code == 0, result.out + result.err
