"""Snapshots: recorded with --update-snapshots, a changed answer fails with a diff, a missing one says how
to record it, and entries no test uses any more are reported."""

from __future__ import annotations

import yaml

from sft_spec_plugins.common.escape import safe

SPEC = """\
    model: builtin:tiny-gemma
    method: lora
    lora: {r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}
    training: {num_train_epochs: 2, learning_rate: 1.0e-2}
    generation: {max_new_tokens: 6}
    data:
      conversations:
        - - {role: user, content: 微调测试}
          - {role: assistant, content: 我学会了}
    expect:
      - prompt: 微调测试
        snapshot: true
"""


def test_snapshot_record_change_missing_and_unused(sft, write_spec, tmp_path):
    path = write_spec("snap.sft.yaml", SPEC)
    recorded = tmp_path / "__snapshots__" / "snap.yaml"

    first = sft("run", path, "--update-snapshots", "--no-cache")
    assert first.code == 0, first.out
    assert "snapshots: 1 added" in first.out
    entries = yaml.safe_load(recorded.read_text(encoding="utf-8"))
    answer = first.recorder.reports[0].expectations[0].answer
    assert entries == {"snap::expect[0]": answer}

    # Someone's change altered the answer: simulate it by editing the record, and leave a stale entry.
    recorded.write_text(yaml.safe_dump({"snap::expect[0]": answer + "变", "gone::expect[3]": "x"},
                                       allow_unicode=True), encoding="utf-8")
    changed = sft("run", path, "--no-cache")
    assert changed.code == 1
    assert f"expected: {safe(answer)}变" in changed.out  # a random model's control characters, shown escaped
    assert "diff:" in changed.out and "[-变-]" in changed.out
    assert "snapshots: 1 unused" in changed.out and "gone::expect[3]" in changed.out

    recorded.unlink()
    missing = sft("run", path, "--no-cache")
    assert missing.code == 1
    assert "no snapshot recorded for snap::expect[0]" in missing.out
    assert "--update-snapshots" in missing.out


def test_update_rewrites_a_changed_snapshot_and_drops_unused(sft, write_spec, tmp_path):
    path = write_spec("snap.sft.yaml", SPEC)
    recorded = tmp_path / "__snapshots__" / "snap.yaml"
    recorded.parent.mkdir()
    recorded.write_text(yaml.safe_dump({"snap::expect[0]": "old", "gone::expect[0]": "x"}), encoding="utf-8")
    result = sft("run", path, "--update-snapshots")
    assert result.code == 0, result.out
    assert "snapshots: 1 changed" in result.out and "snapshots: 1 removed" in result.out
    entries = yaml.safe_load(recorded.read_text(encoding="utf-8"))
    assert list(entries) == ["snap::expect[0]"] and entries["snap::expect[0]"] != "old"


def test_snapshot_takes_only_true(sft, write_spec):
    result = sft("validate", write_spec("bad.sft.yaml", SPEC.replace("snapshot: true", "snapshot: yes please")))
    assert result.code == 1
    assert "snapshot: expected true" in result.out


def test_a_snapshot_file_that_cannot_be_written_errors_its_spec_only(sft, write_spec, tmp_path, one_answer_spec):
    """Before, an OSError while saving ended the whole session with a traceback."""
    write_spec("snap.sft.yaml", SPEC)
    write_spec("other.sft.yaml", one_answer_spec())
    (tmp_path / "__snapshots__").write_text("a file where the folder should be", encoding="utf-8")
    result = sft("run", tmp_path, "--update-snapshots", "--no-cache")
    assert result.code == 1
    assert "Traceback" not in result.out + result.err
    snap, other = result.recorder.by_id("snap"), result.recorder.by_id("other")
    assert snap.outcome == "error" and snap.error.phase == "persist"
    assert "could not save the files this spec records" in snap.error.message
    assert other.outcome == "passed"


def test_two_spec_files_with_the_same_stem_keep_their_own_snapshots(sft, write_spec, tmp_path):
    write_spec("x.sft.yaml", SPEC)
    write_spec("x.sft.yml", SPEC.replace("prompt: 微调测试", "prompt: 你好"))
    result = sft("run", tmp_path, "--update-snapshots", "--no-cache")
    assert result.code == 0, result.out
    yaml_file, yml_file = tmp_path / "__snapshots__" / "x.yaml", tmp_path / "__snapshots__" / "x.yml"
    answers = {r.path.rsplit(".", 1)[1]: r.expectations[0].answer for r in result.recorder.reports}
    assert yaml.safe_load(yaml_file.read_text(encoding="utf-8")) == {"x::expect[0]": answers["yaml"]}
    assert yaml.safe_load(yml_file.read_text(encoding="utf-8")) == {"x::expect[0]": answers["yml"]}
    assert sft("run", tmp_path, "--no-cache").code == 0  # each reads its own back


def test_a_very_long_spec_name_does_not_break_the_output_folder(sft, write_spec, one_answer_spec, tmp_path):
    name = "测" * 100 + "x" * 200  # 300 characters, 500 bytes: no file name can hold it
    result = sft("run", write_spec("long.sft.yaml", f"name: {name}\n" + one_answer_spec(epochs=2)),
                 "--no-cache", "--output-dir", tmp_path / "out", "--json", tmp_path / "r.json")
    report = result.recorder.reports[0]
    assert report.error is None and report.name == name, report.error
    assert all(len(p.name.encode()) < 255 for p in (tmp_path / "out").rglob("*"))
