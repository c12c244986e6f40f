"""The gate on real runs: `compare` tells a seed's noise from a planted regression, decides on verdicts,
and renders the same evidence in the terminal, Markdown, HTML and JSON; thresholds judged on intervals."""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from sft_spec.cli import main

PAIRS = [("微调测试", "我学会了"), ("你叫什么名字", "我叫小明"), ("今天星期几", "今天星期五"),
         ("一加一等于几", "等于二"), ("apple", "苹果"), ("banana", "香蕉"), ("grape", "葡萄"), ("melon", "西瓜"),
         ("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("black", "黑色"), ("tiger", "老虎"),
         ("panda", "熊猫"), ("spring", "春天"), ("winter", "冬天")]
RECIPE = """\
model: builtin:tiny-gemma
method: full
training: {{num_train_epochs: 30, learning_rate: {lr}, per_device_train_batch_size: 8, seed: {seed}}}
{repeat}
data:
  conversations:
{conversations}
eval:
  golden:
    path: rows.jsonl
    id: id
    prompt: question
    reference: answer
    checks: {{equals: "{{reference}}", chrf: {{}}}}
    pass_rate: {{at_least: 0.5}}
"""


def recipe(lr: str = "3.0e-3", seeds: str | None = "[1, 2, 3]", seed: int = 42) -> str:
    conversations = "\n".join(f"    - - {{role: user, content: {q}}}\n      - {{role: assistant, content: {a}}}"
                              for q, a in PAIRS)
    repeat = f"repeat: {{seeds: {seeds}, pass_rate: 0.5}}" if seeds else ""
    return RECIPE.format(lr=lr, repeat=repeat, conversations=conversations, seed=seed)


@pytest.fixture(scope="module")
def gate_runs(tmp_path_factory):
    """One recipe run four times: BASE with seeds 1-3, the same recipe with seeds 4-6 (nothing changed but
    the seeds), a planted regression (a learning rate too small to teach) with seeds 1-3, and two single-seed
    runs with seeds 1 and 2."""
    import contextlib
    import io

    folder = tmp_path_factory.mktemp("gate")
    (folder / "pyproject.toml").write_text("[project]\nname = 'g'\n", encoding="utf-8")
    (folder / "rows.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "question": q, "answer": a},
                                                          ensure_ascii=False) + "\n" for i, (q, a) in enumerate(PAIRS)),
                                       encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for name, text in (("base", recipe()), ("seeds", recipe(seeds="[4, 5, 6]")),
                           ("planted", recipe(lr="1.0e-5")), ("one1", recipe(seeds=None, lr="6.0e-4", seed=1)),
                           ("one2", recipe(seeds=None, lr="6.0e-4", seed=2))):
            (folder / "g.sft.yaml").write_text(textwrap.dedent(text), encoding="utf-8")
            with contextlib.redirect_stdout(io.StringIO()):
                main(["run", "g.sft.yaml", "--no-cache", "--json", f"{name}.json"])
    finally:
        os.chdir(cwd)
    return folder


def test_runs_that_differ_only_in_their_seeds_show_no_detectable_change_and_pass_the_gate(gate_runs, sft):
    # 16 rows that pass on every seed rule out a drop of 0.2, not of 0.05 (that takes about 60 rows: a set
    # that passed everywhere is still a sample of rows); docs/gate.md says how to size a set.
    result = sft("compare", gate_runs / "base.json", gate_runs / "seeds.json", "--fail-on-regression", "-v",
                 "--tolerance", "pass_rate=0.2")
    assert result.code == 0, result.out
    lines = [line for line in result.out.splitlines() if "difference" in line and
             any(name in line for name in ("pass_rate:", "mean_chrf:", "final_loss:"))]
    assert len(lines) == 3, result.out
    assert all("no detectable change" in line for line in lines), result.out
    assert "seeds not paired (1, 2, 3 against 4, 5, 6)" in result.out


def test_a_planted_regression_is_named_with_its_interval_p_value_and_flipped_rows_in_every_rendering(
        gate_runs, sft, tmp_path):
    result = sft("compare", gate_runs / "base.json", gate_runs / "planted.json", "--fail-on-regression",
                 "--md", tmp_path / "c.md", "--html", tmp_path / "c.html", "--json", tmp_path / "c.json")
    assert result.code == 1, result.out
    out = result.out
    assert "eval[golden] pass_rate: 1.000 -> 0, difference -1.00" in out and "WORSE" in out
    assert "after Holm over 3" in out and "(95%: " in out
    assert "McNemar's exact test on seed 1: 16 rows passed -> failed" in out
    assert "row q0 (" in out and "passed -> failed; answer '我学会了' -> " in out
    doc = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    md = (tmp_path / "c.md").read_text(encoding="utf-8")
    page = (tmp_path / "c.html").read_text(encoding="utf-8")
    assert doc["regressions"] and len(doc["regressions"]) == out.count("WORSE") // 2 + 1  # each listed twice
    import html

    from sft_spec_plugins.common.escape import md_text

    for regression in doc["regressions"]:  # every counted regression, in all four renderings
        assert regression in out
        assert md_text(regression) in md
        assert html.escape(regression.split(": ", 1)[1][:40], quote=False) in page
    quantity = next(q for q in doc["quantities"] if q["name"] == "pass_rate")
    assert quantity["verdict"] == "worse" and quantity["p_worse_adjusted"] < 0.05
    assert len(quantity["flipped"]) == 16 and quantity["diff"]["low"] is not None


def test_two_single_seed_runs_with_other_seeds_are_inconclusive_not_significant(gate_runs, sft):
    result = sft("compare", gate_runs / "one1.json", gate_runs / "one2.json", "--fail-on-regression", "-v")
    assert result.code == 0, result.out
    lines = [line for line in result.out.splitlines() if "difference" in line and "eval[golden]" in line]
    assert len(lines) == 2, result.out  # pass_rate and mean_chrf
    for line in lines:
        assert "inconclusive" in line and "cannot be told from seed noise" in line, line
    assert "seeds not paired (1 against 2)" in result.out and "repeat: {seeds: [1, 2, 3]}" in result.out
    assert "corpus CHRF" not in result.out  # a corpus test of unpaired seeds would be noise too
    strict = sft("compare", gate_runs / "one1.json", gate_runs / "one2.json", "--fail-on-regression",
                 "--fail-on-inconclusive")
    assert strict.code == 1


def test_the_same_seed_on_both_sides_adds_sacrebleus_corpus_test_as_evidence(gate_runs, sft):
    result = sft("compare", gate_runs / "one1.json", gate_runs / "one1.json", "-v")
    assert "identical in both runs" in result.out
    doc = json.loads((gate_runs / "one1.json").read_text(encoding="utf-8"))
    rows = next(iter(doc["specs"][0]["eval_sets"].values()))["rows"]
    rows[0]["answer"], rows[0]["passed"], rows[0]["scores"]["chrf"] = "别的", False, 0.0
    path = gate_runs / "one1-edited.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    edited = sft("compare", gate_runs / "one1.json", path, "-v")
    assert "corpus CHRF" in edited.out and "sacrebleu paired bootstrap" in edited.out, edited.out
    assert "McNemar's exact test on seed 1: 1 rows passed -> failed" in edited.out


def test_a_diverged_loss_in_head_is_worse_and_an_inconclusive_threshold_is_not_a_regression(gate_runs, sft, tmp_path):
    doc = json.loads((gate_runs / "one1.json").read_text(encoding="utf-8"))
    doc["specs"][0]["metrics"]["final_loss"] = "nan"
    (tmp_path / "nan.json").write_text(json.dumps(doc), encoding="utf-8")
    result = sft("compare", gate_runs / "one1.json", tmp_path / "nan.json", "--fail-on-regression")
    assert result.code == 1 and "training diverged in HEAD (seed 1)" in result.out, result.out
    doc = json.loads((gate_runs / "one1.json").read_text(encoding="utf-8"))
    spec = doc["specs"][0]
    spec["outcome"] = spec["training_checks"][0]["outcome"] = "failed"
    next(iter(spec["eval_sets"].values()))["verdict"] = "inconclusive"
    (tmp_path / "inconclusive.json").write_text(json.dumps(doc), encoding="utf-8")
    lenient = sft("compare", gate_runs / "one1.json", tmp_path / "inconclusive.json", "--fail-on-regression")
    assert lenient.code == 0 and "(inconclusive: its interval straddles the threshold)" in lenient.out, lenient.out
    strict = sft("compare", gate_runs / "one1.json", tmp_path / "inconclusive.json", "--fail-on-regression",
                 "--fail-on-inconclusive")
    assert strict.code == 1


def test_a_results_file_of_the_previous_version_still_compares(gate_runs, sft, tmp_path):
    doc = json.loads((gate_runs / "one1.json").read_text(encoding="utf-8"))
    for spec in doc["specs"]:
        for data in spec.get("eval_sets", {}).values():
            for key in ("uncertainty", "seeds"):
                data.pop(key, None)
            for row in data["rows"]:
                row.pop("key", None)
        # Where version 1 kept the eval sets and the result cache's flag.
        spec["extra"]["eval"], spec["metrics"]["cached"] = spec.pop("eval_sets"), spec.pop("cached")
    doc["schema_version"] = 1
    (tmp_path / "old.json").write_text(json.dumps(doc), encoding="utf-8")
    # Rendered again as JSON, it is written in this version's layout and says so (a version-1 reader would
    # otherwise take it and find no eval set).
    assert sft("report", tmp_path / "old.json", "--json", tmp_path / "again.json").code == 0
    again = json.loads((tmp_path / "again.json").read_text(encoding="utf-8"))
    assert again["schema_version"] == 2 and all("eval" not in s["extra"] for s in again["specs"])
    assert any(s["eval_sets"] for s in again["specs"])
    result = sft("compare", tmp_path / "old.json", gate_runs / "one1.json", "-v")
    assert result.code == 0, result.out + result.err
    assert "rows paired by position (a results file without row keys)" in result.out
    assert "no interval" in result.out  # the final loss, one value per side
    doc = json.loads((gate_runs / "base.json").read_text(encoding="utf-8"))
    for spec in doc["specs"]:  # a repeat: run of an earlier version: the first seed's rows only
        for data in spec["eval_sets"].values():
            for row in data["rows"]:
                row.pop("by_seed", None)
    (tmp_path / "old-repeat.json").write_text(json.dumps(doc), encoding="utf-8")
    result = sft("compare", tmp_path / "old-repeat.json", gate_runs / "base.json", "-v")
    assert result.code == 0 and "only seed 1's rows are in a results file without by_seed" in result.out


def test_tolerance_names_are_checked_and_a_metric_covers_its_aggregates(gate_runs, sft):
    typo = sft("compare", gate_runs / "base.json", gate_runs / "planted.json", "--tolerance", "finalloss=0.05")
    assert typo.code == 4 and "unknown quantity 'finalloss'. Did you mean: final_loss?" in typo.err
    loose = sft("compare", gate_runs / "base.json", gate_runs / "planted.json", "--tolerance", "chrf=100")
    assert "mean_chrf: 100.0 -> 0" in loose.out and "(worse by more than the margin 100" not in loose.out
    percent = sft("compare", gate_runs / "base.json", gate_runs / "planted.json", "--tolerance", "final_loss=5%")
    assert percent.code == 0
    for bad in ("x", "chrf=-1", "chrf=nan", "chrf=inf", "chrf=.", "chrf=1e", "chrf=--1"):
        assert sft("compare", gate_runs / "base.json", gate_runs / "planted.json", "--tolerance", bad).code == 4, bad


CONFIDENT = """\
model: builtin:tiny-gemma
training: {{num_train_epochs: 1, learning_rate: 1.0e-3}}
generation: {{max_new_tokens: 4}}
data:
  conversations:
    - - {{role: user, content: a}}
      - {{role: assistant, content: b}}
eval:
  sure:
    rows: {rows}
    prompt: q
    checks: {{{check}}}
    pass_rate: {{at_least: {bound}, confidence: 0.95}}
"""


@pytest.mark.parametrize("check,bound,outcome,words", [
    ("not_equals: never", 0.5, "passed", "the 95% interval 0.51 to 1 holds at least 0.5"),
    ("equals: never", 0.9, "failed", "misses at least 0.9"),
    ("not_equals: never", 0.9, "failed", "inconclusive: the 95% interval 0.51 to 1 straddles at least 0.9 "
                                         "(about 36 rows would settle it)"),
])
def test_a_threshold_with_confidence_is_judged_on_its_interval(tmp_path, sft, check, bound, outcome, words):
    rows = json.dumps([{"q": f"问题{i}"} for i in range(4)], ensure_ascii=False)
    path = tmp_path / "c.sft.yaml"
    path.write_text(CONFIDENT.format(rows=rows, check=check, bound=bound), encoding="utf-8")
    result = sft("run", path, "--no-cache", "--json", tmp_path / "r.json")
    case = result.recorder.reports[0].training_checks[0]
    assert case.outcome == outcome and words in case.checks[0].message, case.checks[0].message
    data = next(iter(json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["specs"][0]["eval_sets"]
                     .values()))
    assert data.get("verdict") == ("inconclusive" if "inconclusive" in words else None)
    assert data["uncertainty"]["pass_rate"]["method"] == "Wilson"


@pytest.mark.parametrize("threshold", ["pass_rate: {}", "mean: {chrf: {}}", "pass_rate: {at_least: .nan}",
                                       "pass_rate: {at_least: 0.5, confidence: 1}"])
def test_empty_nan_and_impossible_thresholds_are_located_errors(tmp_path, sft, threshold):
    path = tmp_path / "c.sft.yaml"
    text = CONFIDENT.format(rows='[{"q": "x", "reference": "y"}]', check="chrf: {}", bound=0.5)
    path.write_text(text.replace("pass_rate: {at_least: 0.5, confidence: 0.95}", threshold), encoding="utf-8")
    result = sft("validate", path)
    assert result.code == 1 and "c.sft.yaml:" in result.out, result.out


def _rewritten(source, tmp_path, name, edit):
    doc = json.loads(source.read_text(encoding="utf-8"))
    edit(doc["specs"][0])
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def _without_eval(spec):
    spec["training_checks"] = [c for c in spec["training_checks"] if "eval[" not in c["nodeid"]]
    spec.pop("eval_sets", None)
    spec["outcome"] = "passed"


def test_a_failing_check_deleted_or_xfailed_is_counted_not_fixed(gate_runs, sft, tmp_path):
    planted = gate_runs / "planted.json"
    deleted = _rewritten(planted, tmp_path, "deleted.json", _without_eval)
    result = sft("compare", planted, deleted, "--fail-on-regression")
    assert result.code == 1 and "eval[golden]: failed -> removed (its checks no longer run)" in result.out, result.out
    assert "(fixed)" not in result.out
    allowed = sft("compare", planted, deleted, "--fail-on-regression", "--allow-removed", "g.sft.yaml::g::eval[golden]")
    assert allowed.code == 0, allowed.out
    muted = _rewritten(planted, tmp_path, "muted.json", lambda spec: spec.update(outcome="xfailed"))
    result = sft("compare", planted, muted, "--fail-on-regression")
    assert result.code == 1 and "failed -> xfailed (now expected to fail)" in result.out, result.out


def test_every_rendering_calls_a_spec_with_a_counted_quantity_a_regression(gate_runs, sft, tmp_path):
    def slower_to_learn(spec):  # the outcome holds; only the final loss got worse, on every seed
        spec["metrics"]["final_loss"] *= 5000
        for seed in spec["extra"]["seeds"]:
            seed["final_loss"] *= 5000

    head = _rewritten(gate_runs / "base.json", tmp_path, "head.json", slower_to_learn)
    result = sft("compare", gate_runs / "base.json", head, "--fail-on-regression", "--md", tmp_path / "c.md",
                 "--html", tmp_path / "c.html", "--json", tmp_path / "c.json")
    assert result.code == 1 and "g.sft.yaml::g: passed -> passed (REGRESSION)" in result.out, result.out
    assert "(**regression**)" in (tmp_path / "c.md").read_text(encoding="utf-8")
    assert 'data-transition="regressed"' in (tmp_path / "c.html").read_text(encoding="utf-8")
    assert json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["specs"][0]["transition"] == "regressed"
    assert "1 regressed" in result.out


def test_compare_json_follows_its_schema(gate_runs, sft, tmp_path):
    from importlib.resources import files

    import jsonschema

    schema = json.loads(files("sft_spec_plugins.report").joinpath("schemas/compare.schema.json").read_text("utf-8"))
    for base, head in (("base.json", "planted.json"), ("one1.json", "one1.json")):
        out = tmp_path / f"{base}-{head}"
        sft("compare", gate_runs / base, gate_runs / head, "--json", out)
        doc = json.loads(out.read_text(encoding="utf-8"))
        jsonschema.validate(doc, schema)
        # A run compared with itself has no change for sacrebleu to test (its p-value was tiny there).
        assert base != head or not any(q["evidence"].get("corpus") for q in doc["quantities"]), doc["quantities"]
