"""What a spec's files may decode to, bounded before and while decoding (rows, cells, decoded bytes), and
the budgets a reference sets (an answer's tokens, a scored text's logits): each past its bound is a located
error for that spec, never an exhausted machine."""

from __future__ import annotations

import textwrap

import pytest

HEAD = """\
model: builtin:tiny-gemma
method: lora
training: {num_train_epochs: 1}
"""
ONE_CONVERSATION = """\
data:
  conversations:
    - - {role: user, content: 微调测试}
      - {role: assistant, content: 我学会了}
"""


def _million_rows():
    import pyarrow

    # Two million copies of one short string: dictionary-encoded and compressed, a few KB on disk.
    return pyarrow.table({"prompt": pyarrow.array(["微调测试"] * 2_000_000).dictionary_encode(),
                          "completion": pyarrow.array(["我学会了"] * 2_000_000).dictionary_encode()})


def test_a_small_parquet_file_that_decodes_to_millions_of_rows_is_refused(tmp_path, sft):
    import pyarrow.parquet as pq

    pq.write_table(_million_rows(), tmp_path / "rows.parquet", compression="zstd")
    assert (tmp_path / "rows.parquet").stat().st_size < 200_000
    spec = tmp_path / "p.sft.yaml"
    spec.write_text(HEAD + "data:\n  files: [{path: rows.parquet}]\n", encoding="utf-8")
    result = sft("validate", spec)
    assert result.code == 1 and "rows.parquet" in result.out and "more than 1,000,000 rows" in result.out, result.out


def test_a_small_arrow_file_that_decodes_to_millions_of_rows_is_refused(tmp_path, sft):
    import pyarrow
    import pyarrow.ipc

    table = _million_rows()
    options = pyarrow.ipc.IpcWriteOptions(compression="zstd")
    with pyarrow.OSFile(str(tmp_path / "rows.arrow"), "wb") as sink:
        with pyarrow.ipc.new_stream(sink, table.schema, options=options) as writer:
            writer.write_table(table, max_chunksize=250_000)
    assert (tmp_path / "rows.arrow").stat().st_size < 1_000_000
    spec = tmp_path / "a.sft.yaml"
    spec.write_text(HEAD + "data:\n  files: [{path: rows.arrow}]\n", encoding="utf-8")
    result = sft("validate", spec)
    assert result.code == 1 and "rows.arrow" in result.out and "more than 1,000,000 rows" in result.out, result.out


def test_a_csv_of_a_wide_header_over_bare_commas_is_refused_by_its_cells(tmp_path, sft, monkeypatch):
    from sft_spec_plugins.collect import rows

    monkeypatch.setattr(rows, "MAX_CELLS", 1000)  # the rule, at a size a test writes quickly
    header = ",".join(["prompt", "completion"] + [f"c{i}" for i in range(98)])
    (tmp_path / "wide.csv").write_text(header + "\n" + ("微调测试,我学会了" + "," * 98 + "\n") * 20, encoding="utf-8")
    spec = tmp_path / "w.sft.yaml"
    spec.write_text(HEAD + "data:\n  files: [{path: wide.csv}]\n", encoding="utf-8")
    result = sft("validate", spec)
    # 100 cells a row, 21 rows: refused from its separators, before a row is built.
    assert result.code == 1 and "wide.csv" in result.out and "more than 1,000 cells" in result.out, result.out


def test_a_long_reference_sets_no_answer_budget_past_the_bound(tmp_path, sft):
    reference = "我学会了" * 3000
    spec = tmp_path / "r.sft.yaml"
    spec.write_text(HEAD + ONE_CONVERSATION + f"expect:\n  - prompt: 微调测试\n    equals: {reference}\n",
                    encoding="utf-8")
    result = sft("run", spec, "--no-cache")
    report = result.recorder.reports[0]
    assert report.outcome == "error" and "past the 4,096 sft-spec derives by itself" in report.error.message
    assert report.error.location.endswith("r.sft.yaml:9:5"), report.error.location
    # Said in generation:, the budget is the spec's own.
    spec.write_text(HEAD + ONE_CONVERSATION + "generation: {max_new_tokens: 8}\n"
                    f"expect:\n  - prompt: 微调测试\n    equals: {reference}\n", encoding="utf-8")
    assert sft("run", spec, "--no-cache").recorder.reports[0].outcome == "failed"


def test_a_held_out_text_longer_than_the_model_scores_is_an_error_at_its_row(tmp_path, sft):
    long_text = "今天天气很好，我们去公园散步吧。" * 400  # past tiny-gemma's 2,048-token context
    (tmp_path / "held.jsonl").write_text('{"text": "学习新东西需要时间和耐心。"}\n' + f'{{"text": "{long_text}"}}\n',
                                         encoding="utf-8")
    spec = tmp_path / "h.sft.yaml"
    spec.write_text(HEAD + ONE_CONVERSATION + textwrap.dedent("""\
        eval:
          heldout:
            path: held.jsonl
            text: text
            checks: {perplexity: {}}
        """), encoding="utf-8")
    result = sft("run", spec, "--no-cache")
    report = result.recorder.reports[0]
    shown = report.error.message if report.error else str([c.checks for c in report.cases])
    assert "this model scores at most 2,048 at once" in shown and "held.jsonl:2" in result.out, result.out


def _nested_nulls(count: int):
    import pyarrow

    # One row whose column "x" is a list of `count` nulls: a few bytes of Arrow, `count` Python objects.
    return pyarrow.table({"prompt": ["微调测试"], "completion": ["我学会了"],
                          "x": pyarrow.array([[None] * count], type=pyarrow.list_(pyarrow.null()))})


@pytest.mark.parametrize("suffix", ["parquet", "arrow"])
def test_values_nested_in_a_row_are_counted(tmp_path, sft, suffix):
    import pyarrow
    import pyarrow.ipc
    import pyarrow.parquet as pq

    table = _nested_nulls(12_000_000)
    path = tmp_path / f"nested.{suffix}"
    if suffix == "parquet":
        pq.write_table(table, path)
    else:
        with pyarrow.OSFile(str(path), "wb") as sink, pyarrow.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    spec = tmp_path / "n.sft.yaml"
    spec.write_text(HEAD + f"data:\n  files: [{{path: nested.{suffix}}}]\n", encoding="utf-8")
    result = sft("validate", spec)
    assert result.code == 1 and "more than 10,000,000 cells" in result.out, result.out


@pytest.mark.parametrize("name,text", [
    ("rows.json", '[{"prompt": "微调测试", "completion": "我学会了", "x": [' + "0.0," * 1500 + "0.0]}]"),
    ("rows.jsonl", '{"prompt": "微调测试", "completion": "我学会了", "x": [' + "0.0," * 1500 + "0.0]}\n"),
])
def test_values_in_a_json_file_are_bounded_before_it_is_parsed(tmp_path, sft, monkeypatch, name, text):
    from sft_spec_plugins.collect import rows

    monkeypatch.setattr(rows, "MAX_CELLS", 1000)  # the rule, at a size a test writes quickly
    (tmp_path / name).write_text(text, encoding="utf-8")
    spec = tmp_path / "j.sft.yaml"
    spec.write_text(HEAD + f"data:\n  files: [{{path: {name}}}]\n", encoding="utf-8")
    result = sft("validate", spec)
    assert result.code == 1 and "more than 1,000 cells" in result.out and name in result.out, result.out
