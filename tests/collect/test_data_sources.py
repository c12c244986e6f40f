"""Training data from the ecosystem: every local format datasets reads, TRL's layouts, row selections, a
hub dataset from the local cache only, and large data masked in batches; the same conversations give the
same masks and the same losses whatever file they came from."""

from __future__ import annotations

import csv
import json

import pytest

PAIRS = [("微调测试", "我学会了"), ("你好", "你好！"), ("天气", "晴天")]
ROWS = [{"prompt": q, "completion": a} for q, a in PAIRS]

SPEC = """\
model: builtin:tiny-gemma
method: full
training: {{num_train_epochs: {epochs}, learning_rate: 3.0e-3, per_device_train_batch_size: 8}}
data:
  files: [{source}]
{rest}"""

EXPECT = """\
expect:
  - prompt: 微调测试
    equals: 我学会了
    before: {not_equals: 我学会了}
"""


def write(folder, name: str, rows: list[dict]) -> str:
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif name.endswith(".csv"):
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import datasets

        dataset = datasets.Dataset.from_list(rows)
        if name.endswith(".parquet"):
            dataset.to_parquet(str(path))
        elif name.endswith(".arrow"):
            import pyarrow as pa

            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, dataset.data.table.schema) as writer:
                writer.write_table(dataset.data.table)
        else:  # a folder, as save_to_disk writes it (a DatasetDict: train and test splits)
            datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(path))
    return name


LOSS_CHECK = "checks: {loss_decreased: true}\n"


def run_spec(sft, folder, source: str, rest: str = LOSS_CHECK, epochs: int = 3, *args):
    path = folder / "s.sft.yaml"
    path.write_text(SPEC.format(epochs=epochs, source=source, rest=rest), encoding="utf-8")
    return sft("run", path, "--no-cache", *args)


@pytest.fixture(scope="module")
def by_format(tmp_path_factory):
    """The same three conversations from each format, trained 3 steps: masks and losses per format."""
    from conftest import Recorder

    from sft_spec.cli import main

    out = {}
    for name in ("c.jsonl", "c.json", "c.csv", "c.parquet", "c.arrow", "saved"):
        folder = tmp_path_factory.mktemp(name.replace(".", "_"))
        write(folder, name, ROWS)
        source = f"{{path: {name}" + (", split: train}" if name == "saved" else "}")
        text = SPEC.format(epochs=3, source=source, rest="checks: {loss_decreased: true}\n")
        (folder / "s.sft.yaml").write_text(text, encoding="utf-8")
        recorder = Recorder()
        assert main(["run", str(folder), "--no-cache", "-q"], plugins=[recorder]) == 0
        out[name] = recorder.reports[0]
    return out


def test_every_format_gives_the_same_masks_and_losses(by_format):
    masks = {name: (r.mask.tokens, r.mask.trained, r.mask.examples, r.mask.total_tokens)
             for name, r in by_format.items()}
    losses = {name: r.losses for name, r in by_format.items()}
    assert len(set(map(repr, masks.values()))) == 1, masks
    assert len(set(map(repr, losses.values()))) == 1, losses
    assert by_format["c.jsonl"].mask.examples == 3 and len(by_format["c.jsonl"].losses) == 3


@pytest.mark.parametrize("rows,collator,rest", [
    ([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PAIRS],
     "completion_only", EXPECT),
    (ROWS, "completion_only", EXPECT),
    ([{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
      for q, a in PAIRS], "completion_only", EXPECT),
    ([{"text": f"问：{q} 答：{a}"} for q, a in PAIRS], "full", "checks: {loss_decreased: true}\n"),
], ids=["messages", "prompt_completion_text", "prompt_completion_turns", "text"])
def test_each_trl_layout_trains_and_passes(sft, tmp_path, rows, collator, rest):
    write(tmp_path, "d.jsonl", rows)
    result = run_spec(sft, tmp_path, "{path: d.jsonl}", f"format: {{collator: {collator}}}\n" + rest, 30)
    report = result.recorder.reports[0]
    assert result.code == 0 and report.outcome == "passed", result.out
    assert report.mask.examples == 3


def test_a_text_row_trains_every_token_with_the_full_collator(sft, tmp_path):
    write(tmp_path, "d.jsonl", [{"text": "问：微调测试 答：我学会了"}])
    rest = "format: {collator: full}\nchecks: {loss_decreased: true}\n"
    report = run_spec(sft, tmp_path, "{path: d.jsonl}", rest, 1).recorder.reports[0]
    assert report.mask.trained_text == "问：微调测试 答：我学会了<eos>" and all(report.mask.trained)


@pytest.mark.parametrize("rows,message,where", [
    ([ROWS[0], {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
     "this row is conversational (messages), and the file's rows are prompt/completion: one layout per file",
     "d.jsonl:2"),
    ([{"prompt": "a", "completion": "b", "text": "c"}], "the row fits several layouts", "d.jsonl:1"),
    ([{"question": "a", "answer": "b"}], "the row has none of the keys of TRL's layouts", "d.jsonl:1"),
])
def test_a_row_that_breaks_the_files_layout_is_an_error_at_that_row(sft, tmp_path, rows, message, where):
    write(tmp_path, "d.jsonl", rows)
    (tmp_path / "s.sft.yaml").write_text(SPEC.format(epochs=1, source="{path: d.jsonl}",
                                                     rest="checks: {loss_decreased: true}\n"), encoding="utf-8")
    result = sft("validate", tmp_path / "s.sft.yaml")
    assert result.code == 1 and message in result.out and where in result.out, result.out


def test_a_parquet_row_is_located_by_its_number(sft, tmp_path):
    write(tmp_path, "d.parquet", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}])
    (tmp_path / "s.sft.yaml").write_text(SPEC.format(epochs=1, source="{path: d.parquet}",
                                                     rest="checks: {loss_decreased: true}\n"), encoding="utf-8")
    result = sft("validate", tmp_path / "s.sft.yaml")
    assert result.code == 1 and "d.parquet: row 2:" in result.out, result.out


@pytest.mark.parametrize("selection,count", [("select: '1:3'", 2), ("select: '2:'", 1), ("fraction: 0.5", 2),
                                             ("select: '0:3', fraction: 0.34", 2)])
def test_select_and_fraction_keep_part_of_the_rows(sft, tmp_path, selection, count):
    write(tmp_path, "d.jsonl", ROWS)
    report = run_spec(sft, tmp_path, f"{{path: d.jsonl, {selection}}}", epochs=1).recorder.reports[0]
    assert report.mask.examples == count, report


def test_a_saved_dataset_dict_needs_its_split(sft, tmp_path):
    write(tmp_path, "saved", ROWS)
    for source, message in (("{path: saved}", "holds the splits train, test: choose one with split:"),
                            ("{path: saved, split: trian}", "unknown split 'trian'. Did you mean: train?")):
        (tmp_path / "s.sft.yaml").write_text(SPEC.format(epochs=1, source=source,
                                                         rest="checks: {loss_decreased: true}\n"), encoding="utf-8")
        result = sft("validate", tmp_path / "s.sft.yaml")
        assert result.code == 1 and message in result.out, result.out
    assert run_spec(sft, tmp_path, "{path: saved, split: test}", epochs=1).recorder.reports[0].mask.examples == 1


def test_a_hub_dataset_that_is_not_cached_is_an_error_at_once(sft, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    text = SPEC.format(epochs=1, source="", rest="checks: {loss_decreased: true}\n").replace(
        "  files: []\n", "  dataset: {path: someone/not-cached, split: train}\n")
    (tmp_path / "s.sft.yaml").write_text(text, encoding="utf-8")
    result = sft("validate", tmp_path / "s.sft.yaml")
    assert result.code == 1 and "dataset someone/not-cached[train] is not in the local datasets cache" in result.out


def test_large_data_is_masked_in_batches_like_small_data_and_cached(sft, tmp_path, monkeypatch):
    from sft_spec_plugins.train import collators

    rows = [{"prompt": f"问题{i}", "completion": f"答案{i % 7}"} for i in range(40)]
    write(tmp_path, "d.parquet", rows)
    small = run_spec(sft, tmp_path, "{path: d.parquet}", epochs=1).recorder.reports[0]
    monkeypatch.setattr(collators, "BULK_CONVERSATIONS", 10)
    # A cache of this test's own: the shared test cache outlives pytest sessions and would hold the masks.
    own_cache = ("--cache-dir", tmp_path / "cache")
    bulk = run_spec(sft, tmp_path, "{path: d.parquet}", LOSS_CHECK, 1, *own_cache).recorder.reports[0]
    again = run_spec(sft, tmp_path, "{path: d.parquet}", LOSS_CHECK, 1, *own_cache).recorder.reports[0]
    assert bulk.losses == small.losses and bulk.mask.tokens == small.mask.tokens
    assert (bulk.mask.trained_tokens, bulk.mask.total_tokens) == (small.mask.trained_tokens, small.mask.total_tokens)
    assert any("40 training conversations masked in batches (datasets.map, cached: no, made now)" in n
               for n in bulk.notes), bulk.notes
    assert any("cached: yes" in n for n in again.notes) and again.losses == bulk.losses


def _validate(sft, tmp_path, source: str):
    (tmp_path / "s.sft.yaml").write_text(SPEC.format(epochs=1, source=source, rest=LOSS_CHECK), encoding="utf-8")
    return sft("validate", tmp_path / "s.sft.yaml")


@pytest.mark.parametrize("path", ["/tmp/data", "../outside", "./outside", "outside", "~/data", "json", "a/b/c"])
def test_a_hub_dataset_path_is_a_hub_id_never_a_local_folder(sft, tmp_path, path):
    # load_dataset reads a local folder, absolute or relative to the working directory, before the hub:
    # data.dataset would read files past the spec-folder rule and print them in the reports.
    spec_folder = tmp_path / "spec"
    spec_folder.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside, "s.jsonl", [{"text": "SECRET"}])
    (spec_folder / "outside").mkdir()
    text = SPEC.format(epochs=1, source="", rest=LOSS_CHECK).replace(
        "  files: []\n", f"  dataset: {{path: '{path}'}}\n")
    (spec_folder / "s.sft.yaml").write_text(text, encoding="utf-8")
    result = sft("validate", spec_folder / "s.sft.yaml")
    assert result.code == 1 and "s.sft.yaml:5:" in result.out, result.out
    assert ("is not a hub dataset id" in result.out or "names the local path" in result.out
            or "one of datasets' builders" in result.out), result.out


def test_a_saved_folder_whose_metadata_or_links_point_outside_is_refused(sft, tmp_path):
    import os

    spec_folder = tmp_path / "spec"
    spec_folder.mkdir()
    write(tmp_path, "outside", [{"text": "SECRET"}])
    for name in ("by_state", "by_link", "by_split"):
        write(spec_folder, name, ROWS)
    state = spec_folder / "by_state" / "train" / "state.json"
    doc = json.loads(state.read_text())
    doc["_data_files"] = [{"filename": "../../../outside/train/data-00000-of-00001.arrow"}]
    state.write_text(json.dumps(doc))
    arrow = spec_folder / "by_link" / "train" / "data-00000-of-00001.arrow"
    arrow.unlink()
    os.symlink(tmp_path / "outside" / "train" / "data-00000-of-00001.arrow", arrow)
    splits = spec_folder / "by_split" / "dataset_dict.json"
    splits.write_text(json.dumps({"splits": ["../../outside/train"]}))
    for name, split in (("by_state", "train"), ("by_link", "train"), ("by_split", "../../outside/train")):
        result = _validate(sft, spec_folder, f"{{path: {name}, split: '{split}'}}")
        assert result.code == 1 and "is outside the spec directory" in result.out, (name, result.out)
        assert "SECRET" not in result.out


def test_json_rows_are_located_by_number_and_bad_json_is_an_error_not_a_crash(sft, tmp_path):
    rows = [*ROWS[:2], {"prompt": "a", "completion": 1}]
    (tmp_path / "list.json").write_text(json.dumps(rows), encoding="utf-8")
    result = _validate(sft, tmp_path, "{path: list.json}")
    assert result.code == 1 and "list.json: row 3:" in result.out, result.out
    (tmp_path / "nested.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    result = _validate(sft, tmp_path, "{path: nested.json}")
    assert result.code == 1 and "nested.json" in result.out and "not valid JSON: RecursionError" in result.out
    assert "INTERNALERROR" not in result.out + result.err


@pytest.mark.parametrize("name,text", [
    ("d.jsonl", '{"prompt": "a", "completion": "b", "completion": "c"}\n'),
    ("d.json", '[{"prompt": "a", "completion": "b", "completion": "c"}]'),
])
def test_a_key_written_twice_in_a_row_is_an_error(sft, tmp_path, name, text):
    (tmp_path / name).write_text(text, encoding="utf-8")
    result = _validate(sft, tmp_path, f"{{path: {name}}}")
    assert result.code == 1 and "the key 'completion' is written twice" in result.out, result.out


def test_a_csv_row_with_a_missing_cell_and_a_large_cell(sft, tmp_path):
    (tmp_path / "short.csv").write_text("prompt,completion\na,b\nc\n", encoding="utf-8")
    result = _validate(sft, tmp_path, "{path: short.csv}")
    assert result.code == 1 and "short.csv:3:" in result.out and "no cell for 'completion'" in result.out, result.out
    write(tmp_path, "large.csv", [*ROWS, {"prompt": "长" * 100_000, "completion": "好"}])  # 300 KB, > csv's 128 KiB
    result = _validate(sft, tmp_path, "{path: large.csv}")
    assert result.code == 0, result.out


def test_layout_settles_a_row_that_fits_several(sft, tmp_path):
    (tmp_path / "amb.csv").write_text("prompt,completion,text\n微调测试,我学会了,问：微调测试 答：我学会了\n",
                                      encoding="utf-8")
    assert "fits several layouts" in _validate(sft, tmp_path, "{path: amb.csv}").out
    for layout in ("text", "prompt_completion"):
        result = _validate(sft, tmp_path, f"{{path: amb.csv, layout: {layout}}}")
        assert result.code == 0, result.out


def test_plain_text_is_not_warned_about_an_end_of_turn_it_cannot_have(sft, tmp_path):
    write(tmp_path, "t.jsonl", [{"text": "问：微调测试 答：我学会了"}])
    text = SPEC.format(epochs=2, source="{path: t.jsonl}", rest=LOSS_CHECK).replace(
        "data:", "format: {collator: completion_only, response_template: '答：'}\ndata:")
    (tmp_path / "s.sft.yaml").write_text(text, encoding="utf-8")
    result = sft("run", tmp_path / "s.sft.yaml", "--no-cache")
    assert result.code == 0, result.out
    assert result.recorder.reports[0].mask.trained_tokens < result.recorder.reports[0].mask.total_tokens
    assert not [n for n in result.recorder.reports[0].notes if "end-of-turn" in n]


def test_a_saved_folders_metadata_cannot_climb_out_through_a_link_to_the_spec_folder(sft, tmp_path):
    import os

    spec_folder = tmp_path / "spec"
    spec_folder.mkdir()
    write(tmp_path, "outside", [{"text": "SECRET"}])
    write(spec_folder, "data", ROWS)
    # "up" links to the spec folder itself (inside: allowed), so "up/../outside" looks inside as text and
    # is the spec folder's parent on disk.
    os.symlink(spec_folder, spec_folder / "data" / "up")
    (spec_folder / "data" / "dataset_dict.json").write_text(json.dumps({"splits": ["up/../outside/train"]}))
    result = _validate(sft, spec_folder, "{path: data, split: 'up/../outside/train'}")
    assert result.code == 1 and "is outside the spec directory" in result.out, result.out


@pytest.mark.parametrize("name", ["dup.csv", "dup.parquet"])
def test_a_column_named_twice_is_an_error_not_a_dropped_cell(sft, tmp_path, name):
    if name.endswith(".csv"):
        (tmp_path / name).write_text("prompt,completion,completion\n微调测试,WRONG,我学会了\n", encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_arrays([pa.array(["微调测试"]), pa.array(["WRONG"]), pa.array(["我学会了"])],
                                     names=["prompt", "completion", "completion"])
        pq.write_table(table, tmp_path / name)
    result = _validate(sft, tmp_path, f"{{path: {name}}}")
    assert result.code == 1 and "'completion' twice" in result.out, result.out


def _cache_as_hub_dataset(cache, rows: list[dict], hub_id: str) -> None:
    """What `datasets` leaves in its cache after load_dataset(hub_id) where the hub is reachable: the
    prepared Arrow files under OWNER___NAME/CONFIG/VERSION/HASH. Made offline from a local file."""
    import glob
    import os
    import shutil

    import datasets

    cache.mkdir(parents=True, exist_ok=True)
    (cache / "src.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    datasets.load_dataset("json", data_files={"train": str(cache / "src.jsonl")}, cache_dir=str(cache / "prep"))
    prepared = glob.glob(str(cache / "prep" / "json" / "*" / "*" / "*"))[0]
    owner, name = hub_id.split("/")
    target = cache / f"{owner}___{name}" / "default" / "0.0.0" / os.path.basename(prepared)
    shutil.copytree(prepared, target)
    info = json.loads((target / "dataset_info.json").read_text())
    info.update(builder_name=name, dataset_name=name, config_name="default")
    (target / "dataset_info.json").write_text(json.dumps(info))
    for arrow in target.glob("*.arrow"):
        arrow.rename(target / arrow.name.replace("json-", f"{name}-"))


def test_a_hub_dataset_in_the_local_cache_trains_offline(sft, tmp_path, monkeypatch):
    import datasets

    _cache_as_hub_dataset(tmp_path / "hf-datasets", ROWS, "someone/tiny-set")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "spec"
    folder.mkdir()
    text = SPEC.format(epochs=30, source="", rest=EXPECT).replace(
        "  files: []\n", "  dataset: {path: someone/tiny-set, split: train}\n")
    (folder / "s.sft.yaml").write_text(text, encoding="utf-8")
    result = sft("run", folder / "s.sft.yaml", "--no-cache")
    assert result.code == 0, result.out
    report = result.recorder.reports[0]
    assert report.mask.examples == len(ROWS) and report.expectations[0].outcome == "passed"


def test_a_symlink_loop_inside_a_saved_folder_is_an_error_for_its_spec(sft, tmp_path):
    import os

    write(tmp_path, "saved", ROWS)
    os.symlink("loopy", tmp_path / "saved" / "loopy")
    result = _validate(sft, tmp_path, "{path: saved, split: train}")
    assert result.code == 1 and "cannot be resolved" in result.out, result.out + result.err
    assert "INTERNALERROR" not in result.out + result.err


def test_a_spreadsheets_empty_trailing_columns_are_not_columns_named_twice(sft, tmp_path):
    (tmp_path / "t.csv").write_text("prompt,completion,,\n微调测试,我学会了,,\n", encoding="utf-8")
    assert _validate(sft, tmp_path, "{path: t.csv}").code == 0
