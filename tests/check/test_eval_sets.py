"""Evaluation sets: rows from files in every format, one test case per set, thresholds on the whole set
and on its change from the base model, every row in the JSON; bad sets are located errors."""

from __future__ import annotations

import json
import textwrap

import pytest

PAIRS = [("微调测试", "我学会了"), ("你好", "你好！"), ("天气", "晴天"), ("名字", "小明")]

TRAINED = """\
model: builtin:tiny-gemma
method: full
training: {{num_train_epochs: 30, learning_rate: 3.0e-3, per_device_train_batch_size: 8}}
data:
  conversations:
{conversations}
eval:
{sets}
"""


def conversations(pairs=PAIRS) -> str:
    return "\n".join(f"    - - {{role: user, content: {q}}}\n      - {{role: assistant, content: {a}}}"
                     for q, a in pairs)


def spec(sets: str, pairs=PAIRS) -> str:
    return TRAINED.format(conversations=conversations(pairs), sets=textwrap.indent(textwrap.dedent(sets), "  "))


def write_rows(folder, name: str, rows: list[dict]) -> None:
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif name.endswith(".json"):
        path.write_text(json.dumps({"data": rows}, ensure_ascii=False), encoding="utf-8")
    elif name.endswith(".csv"):
        import csv

        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


GOLDEN = [{"question": q, "answer": a} for q, a in PAIRS]


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    """One trained spec with a golden set (before: fails; after: passes) and a held-out text set."""
    from conftest import Recorder

    from sft_spec.cli import main

    folder = tmp_path_factory.mktemp("golden")
    (folder / "data").mkdir()
    write_rows(folder / "data", "golden.jsonl", GOLDEN)
    (folder / "evals.sft.yaml").write_text(spec("""\
        golden:
          path: data/golden.jsonl
          prompt: question
          reference: answer
          checks: {equals: "{reference}", chrf: {}, likelihood: {gain: 1.0}, stops: true}
          pass_rate: {at_least: 0.75}
          mean: {chrf: {at_least: 60}}
          change: {chrf: {min_gain: 30}}
        heldout:
          rows: [{text: 今天天气很好，我们去公园散步吧。}, {text: 学习新东西需要时间和耐心。}]
          text: text
          checks: {perplexity: {}}
          change: {perplexity: {max_increase: 1000000}}
        """), encoding="utf-8")
    recorder = Recorder()
    out = folder / "out"
    code = main(["run", str(folder), "--no-cache", "--json", str(out / "r.json"), "--junitxml", str(out / "j.xml"),
                 "--html", str(out / "r.html")], plugins=[recorder])
    return {"code": code, "report": recorder.reports[0], "out": out, "folder": folder}


def test_a_trained_recipe_passes_its_golden_set_that_the_base_model_failed(golden_run):
    report = golden_run["report"]
    assert golden_run["code"] == 0, report
    cases = {c.nodeid.rsplit("::", 1)[1]: c for c in report.cases}
    assert set(cases) == {"eval[golden]", "eval[heldout]"}
    golden = report.eval_sets[cases["eval[golden]"].nodeid]
    assert golden["aggregates"]["pass_rate"] >= 0.75
    base = [row["base"] for row in golden["rows"]]
    assert sum(b["passed"] for b in base) == 0  # the base model answered none of them
    assert all(b["scores"]["chrf"] < 30 for b in base)
    assert golden["aggregates"]["change_chrf"] >= 30
    message = cases["eval[golden]"].checks[0].message
    assert message.startswith("pass_rate ") and "mean chrf" in message and "(4 rows, seed 42)" in message
    assert "pass_rate 1.00 ± 0.12 (95%: 0.51 to 1.00) >= 0.75" in message  # Wilson's interval for 4 of 4 rows


def test_every_row_is_in_the_json_worst_first(golden_run):
    from sft_spec_plugins.report.json_report import load_document

    _, reports = load_document(golden_run["out"] / "r.json")
    rows = next(iter(v for k, v in reports[0].eval_sets.items() if k.endswith("[golden]")))["rows"]
    assert sorted(r["index"] for r in rows) == [0, 1, 2, 3]
    keys = [(r["passed"], r["scores"]["chrf"]) for r in rows]
    assert keys == sorted(keys)
    row = next(r for r in rows if r["index"] == 0)
    assert row["prompt"] == "微调测试" and row["reference"] == "我学会了" and row["location"].endswith("golden.jsonl:1")
    assert {"chrf", "likelihood"} <= set(row["scores"]) and row["answer"] is not None


def test_junit_has_one_testcase_per_set_and_html_a_table(golden_run):
    import xml.etree.ElementTree as ET

    tree = ET.parse(golden_run["out"] / "j.xml")
    names = [case.get("name") for case in tree.iter("testcase")]
    assert "evals::eval[golden]" in names or any(n.endswith("eval[golden]") for n in names), names
    html = (golden_run["out"] / "r.html").read_text(encoding="utf-8")
    assert "eval[golden]" in html and 'class="eval-rows"' in html and 'class="histogram"' in html
    assert "before training" in html


def test_held_out_text_is_scored_by_perplexity_before_and_after(golden_run):
    report = golden_run["report"]
    heldout = next(v for k, v in report.eval_sets.items() if k.endswith("[heldout]"))
    assert heldout["aggregates"]["change_perplexity"] != 0
    assert all(r["answer"] is None and r["base"]["scores"]["perplexity"] > 1 for r in heldout["rows"])


@pytest.mark.parametrize("name", ["golden.jsonl", "golden.json", "golden.csv", "golden.parquet"])
def test_rows_come_from_every_format(tmp_path, name, sft):
    write_rows(tmp_path, name, GOLDEN)
    path = tmp_path / "s.sft.yaml"
    path.write_text(spec(f"""\
        golden: {{path: {name}, prompt: question, reference: answer, checks: {{equals: "{{reference}}"}}}}
        """), encoding="utf-8")
    result = sft("run", path, "--co")
    assert result.code == 0, result.out
    assert "<Check eval[golden]> eval set golden: 4 rows from golden." in result.out


def test_k_selects_sets_by_name(tmp_path, sft):
    path = tmp_path / "s.sft.yaml"
    path.write_text(spec("""\
        golden: {rows: [{prompt: 你好, reference: 你好！}], checks: {equals: "{reference}"}}
        other: {rows: [{prompt: 你好, reference: 你好！}], checks: {equals: "{reference}"}}
        """), encoding="utf-8")
    result = sft("run", path, "--co", "-k", "golden")
    assert "eval[golden]" in result.out and "eval[other]" not in result.out


def test_retention_fails_when_training_breaks_what_the_base_model_passed(tmp_path, sft):
    # The base model does not answer 我学会了 to these prompts; training teaches it to: retention 0.
    path = tmp_path / "s.sft.yaml"
    path.write_text(spec("""\
        kept:
          rows: [{prompt: 微调测试, reference: 我学会了}, {prompt: 你好, reference: 你好！}]
          checks: {not_equals: "{reference}"}
          retention: {at_least: 0.5}
        """, PAIRS[:2]), encoding="utf-8")
    result = sft("run", path, "--no-cache")
    case = result.recorder.reports[0].training_checks[0]
    assert case.outcome == "failed", result.out
    assert "retention (0/2) 0 ± 0.17 (95%: 0 to 0.658) < 0.5" in case.checks[0].message


def test_an_xfail_set_is_xfailed(tmp_path, sft):
    path = tmp_path / "s.sft.yaml"
    path.write_text(spec("""\
        kept:
          rows: [{prompt: 微调测试, reference: 我学会了}]
          checks: {not_equals: "{reference}"}
          xfail: training teaches exactly this answer
        """, PAIRS[:1]), encoding="utf-8")
    result = sft("run", path, "--no-cache")
    assert result.code == 0 and result.recorder.reports[0].training_checks[0].outcome == "xfailed", result.out


@pytest.mark.parametrize("sets,message,where", [
    ("golden: {path: rows.jsonl, prompt: question, reference: answer, checks: {equals: '{reference}'}}",
     "no column 'question'", "rows.jsonl:2"),
    ("golden: {path: rows.jsonl, prompt: question, reference: answer, checks: {equls: x}}",
     "unknown check 'equls'. Did you mean: equals", "s.sft.yaml:9:"),
    ("golden: {path: rows.jsonl, prompt: question, reference: answer, checks: {equals: '{answr}'}}",
     "checks name column(s) answr in braces", "s.sft.yaml:9:"),
    ("golden: {path: rows.jsonl, prompt: question, reference: answer, checks: {equals: x}, "
     "mean: {chrf: {at_least: 1}}}",
     "mean.chrf: chrf is not among this set's checks", "s.sft.yaml:9:"),
    ("golden: {path: ../rows.jsonl, prompt: question, reference: answer, checks: {equals: x}}",
     "is outside the spec directory", "s.sft.yaml:9:"),
    ("golden: {rows: [{text: hi}], text: text, checks: {equals: x}}", "only perplexity and likelihood apply",
     "s.sft.yaml:9:"),
    ("golden: {path: rows.jsonl, prompt: question, reference: answer, checks: {chrf: {at_least: 500}}}",
     "outside the score's range", "s.sft.yaml:9:"),
    ("golden: {path: rows.jsonl, rows: [], prompt: question, checks: {equals: x}}", "path (a file of rows) or rows",
     "s.sft.yaml:9:"),
])
def test_bad_sets_are_located_errors(tmp_path, sft, sets, message, where):
    (tmp_path / "rows.jsonl").write_text('{"question": "q", "answer": "a"}\n{"q": "x", "answer": "a"}\n',
                                         encoding="utf-8")
    if "no column" not in message:
        (tmp_path / "rows.jsonl").write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    path = tmp_path / "s.sft.yaml"
    path.write_text(spec(sets, PAIRS[:1]), encoding="utf-8")
    result = sft("validate", path)
    assert result.code == 1
    assert message in result.out and where in result.out, result.out
    assert "Traceback" not in result.out + result.err


def test_an_eval_check_cannot_be_written_by_hand(tmp_path, sft):
    path = tmp_path / "s.sft.yaml"
    path.write_text(spec("golden: {rows: [{prompt: a, reference: b}], checks: {equals: x}}", PAIRS[:1])
                    + "checks: {eval: {rows: 3}}\n", encoding="utf-8")
    result = sft("validate", path)
    assert result.code == 1 and "eval sets are written under the spec's eval: key" in result.out


def test_the_result_cache_sees_a_changed_row(tmp_path, sft):
    write_rows(tmp_path, "golden.jsonl", GOLDEN[:1])
    path = tmp_path / "s.sft.yaml"
    path.write_text(spec("golden: {path: golden.jsonl, prompt: question, reference: answer, "
                         "checks: {equals: '{reference}'}}", PAIRS[:1]), encoding="utf-8")
    first = sft("run", path).recorder.reports[0]
    again = sft("run", path).recorder.reports[0]
    write_rows(tmp_path, "golden.jsonl", [{"question": "微调测试", "answer": "别的"}])
    changed = sft("run", path).recorder.reports[0]
    assert not first.cached and again.cached and not changed.cached
    assert changed.outcome == "failed"


@pytest.mark.parametrize("rows,message,where", [
    ('{"question": "a", "answer": null}\n', "column 'answer' is empty (null)", "rows.jsonl:1"),
    ('{"question": "a", "answer": "b"}\n{"question": "a", "answer": ["x"]}\n', "column 'answer' is a list",
     "rows.jsonl:2"),
])
def test_a_reference_that_is_not_text_is_an_error_at_its_row(tmp_path, sft, rows, message, where):
    (tmp_path / "rows.jsonl").write_text(rows, encoding="utf-8")
    path = tmp_path / "s.sft.yaml"
    path.write_text(spec("golden: {path: rows.jsonl, prompt: question, reference: answer, "
                         "checks: {equals: '{reference}'}}", PAIRS[:1]), encoding="utf-8")
    result = sft("validate", path)
    assert result.code == 1 and message in result.out and where in result.out, result.out


def test_braces_of_a_regex_stay_and_double_braces_are_literal(tmp_path, sft):
    path = tmp_path / "s.sft.yaml"
    path.write_text(spec(r"""golden:
          rows: [{prompt: 微调测试, reference: 我学会了}]
          checks: {regex: '^\w{2,8}$', not_contains: '{{reference}}'}
        """, PAIRS[:1]), encoding="utf-8")
    result = sft("run", path, "--no-cache", "--json", tmp_path / "r.json")
    assert result.code == 0, result.out
    case = result.recorder.reports[0].training_checks[0]
    assert case.outcome == "passed"


def test_a_rows_prompt_that_fails_to_render_is_located_at_the_row(tmp_path, sft):
    (tmp_path / "rows.jsonl").write_text('{"q": "a", "a": "b"}\n{"q": [{"role": "system", "content": "s"}, '
                                         '{"role": "user", "content": "hi"}], "a": "x"}\n', encoding="utf-8")
    path = tmp_path / "s.sft.yaml"
    template = '"{% for m in messages %}{% if m.role == \'system\' %}{{ raise_exception(\'no system role\') }}' \
               '{% endif %}{% if m.role == \'assistant\' %}A: {% endif %}{{ m.content }}\\n{% endfor %}' \
               '{% if add_generation_prompt %}A: {% endif %}"'
    path.write_text(spec("golden: {path: rows.jsonl, prompt: q, reference: a, checks: {equals: '{reference}'}}",
                         PAIRS[:1]) + f"format: {{formatter: template, template: {template}, "
                         "response_template: 'A: '}\n", encoding="utf-8")
    report = sft("run", path, "--no-cache").recorder.reports[0]
    assert report.outcome == "error" and report.error.location.endswith("rows.jsonl:2"), report.error
    assert "eval set 'golden', row 1" in report.error.message and "no system role" in report.error.message


def test_a_rows_cut_answer_says_so_and_its_budget_is_in_the_json(golden_run):
    rows = next(v for k, v in golden_run["report"].eval_sets.items() if k.endswith("[golden]"))["rows"]
    assert all(isinstance(r["max_new_tokens"], int) and r["max_new_tokens"] >= 32 for r in rows)
    assert all(r["base"] is not None for r in rows)
    base_cut = [f for r in rows for f in r.get("failures", []) if "generation stopped at max_new_tokens" in f]
    assert base_cut == [] or all("before the end of turn" in f for f in base_cut)


def test_junit_carries_a_passing_sets_aggregate(golden_run):
    import xml.etree.ElementTree as ET

    tree = ET.parse(golden_run["out"] / "j.xml")
    case = next(c for c in tree.iter("testcase") if c.get("name", "").endswith("eval[golden]"))
    assert case.find("system-out") is not None and "pass_rate" in case.find("system-out").text


def test_a_run_whose_eval_mean_is_nan_is_rendered_again_by_report(golden_run, tmp_path):
    # A metric can be NaN (a diverged model's perplexity); the JSON writes it as text, and every rendering of
    # that file must show it as such instead of failing.
    from sft_spec.cli import main

    doc = json.loads((golden_run["out"] / "r.json").read_text(encoding="utf-8"))
    heldout = next(v for k, v in doc["specs"][0]["eval_sets"].items() if k.endswith("[heldout]"))
    heldout["aggregates"]["mean_perplexity"] = "nan"
    heldout["rows"][0]["scores"]["perplexity"] = "inf"
    edited = tmp_path / "nan.json"
    edited.write_text(json.dumps(doc), encoding="utf-8")
    code = main(["report", str(edited), "--html", str(tmp_path / "r.html"),
                 "--junitxml", str(tmp_path / "j.xml")])
    assert code == 0
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert '<td class="mono">nan</td>' in html and "&rarr; inf</td>" in html and "1 not a finite number" in html


def test_an_eval_sets_check_reads_as_a_sentence_everywhere(golden_run, sft):
    listed = sft("run", golden_run["folder"], "--co")
    assert "<Check eval[golden]> eval set golden: 4 rows from data/golden.jsonl" in listed.out, listed.out
    html = (golden_run["out"] / "r.html").read_text(encoding="utf-8")
    assert "eval: eval set golden: 4 rows from data/golden.jsonl" in html and "&#39;set&#39;" not in html


def test_a_check_on_a_columns_literal_name_and_trained_prompts_are_noted(tmp_path, sft):
    write_rows(tmp_path, "rows.jsonl", [{"question": q, "answer": a} for q, a in PAIRS] +
               [{"question": "从未训练过的问题", "answer": "无"}])
    (tmp_path / "s.sft.yaml").write_text(spec("""\
        golden:
          path: rows.jsonl
          prompt: question
          reference: answer
          checks: {equals: answer}
        """), encoding="utf-8")
    result = sft("validate", tmp_path / "s.sft.yaml", "-v")
    assert result.code == 0, result.out
    assert "equals 'answer' is compared as that literal word; did you mean \"{answer}\"" in result.out, result.out
    assert f"{len(PAIRS)} of {len(PAIRS) + 1} prompts are also in the training data" in result.out
