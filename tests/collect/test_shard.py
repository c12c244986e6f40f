"""``--shard I/N`` splits a suite into deterministic slices (CI matrix jobs, Kubernetes Indexed Jobs, Slurm
arrays) and ``sft-spec report --merge`` joins their results into what one run of the whole suite gives:
the same specs in the same order, the same counts and the same exit status; a missing shard is said."""

from __future__ import annotations

import json

import pytest

SPEC = """\
model: builtin:tiny-gemma
method: full
training: {{num_train_epochs: 1, learning_rate: 1.0e-3}}
data:
  conversations:
    - - {{role: user, content: 微调测试}}
      - {{role: assistant, content: 我学会了}}
checks: {{final_loss_below: {loss}}}
{rest}"""


@pytest.fixture
def suite(tmp_path):
    """Five specs (one fails its check, one has two matrix variants) and a file that does not load."""
    folder = tmp_path / "specs"
    folder.mkdir()
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'p'\n", encoding="utf-8")
    for name in ("a", "b", "d"):
        (folder / f"{name}.sft.yaml").write_text(SPEC.format(loss="100.0", rest=""), encoding="utf-8")
    # No loss is below zero: fails, so the exit status is 1.
    (folder / "c.sft.yaml").write_text(SPEC.format(loss="0.0", rest=""), encoding="utf-8")
    (folder / "e.sft.yaml").write_text(SPEC.format(loss="100.0", rest="matrix:\n  - {id: one}\n  - {id: two}\n"),
                                       encoding="utf-8")
    (folder / "broken.sft.yaml").write_text("model: [unclosed\n", encoding="utf-8")
    return folder


def specs_of(path) -> list[tuple[str, str]]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    return [(s["nodeid"], s["outcome"]) for s in doc["specs"]]


def test_shards_merge_into_what_one_run_gives(sft, suite, tmp_path):
    whole = sft("run", suite, "--no-cache", "--json", tmp_path / "whole.json")
    parts = [sft("run", suite, "--no-cache", "--shard", f"{i}/3", "--json", tmp_path / f"part{i}.json")
             for i in (1, 2, 3)]
    single = specs_of(tmp_path / "whole.json")
    assert whole.code == 1 and len(single) == 7  # 6 specs (e twice) and the broken file
    ran = [nodeid for i in (1, 2, 3) for nodeid, _ in specs_of(tmp_path / f"part{i}.json") if "broken" not in nodeid]
    assert sorted(ran) == sorted(n for n, _ in single if "broken" not in n)  # every spec in exactly one shard
    assert {p.code for p in parts} == {1}  # every shard reports the broken file; c fails in one of them
    merged = sft("report", "--merge", *(tmp_path / f"part{i}.json" for i in (3, 1, 2)), "--json", tmp_path / "m.json",
                 "--html", tmp_path / "m.html")
    assert merged.code == whole.code == 1, merged.out + merged.err  # the merge gates as one run would
    assert specs_of(tmp_path / "m.json") == single  # collection order, whatever order the parts are given in
    doc, one = (json.loads((tmp_path / n).read_text(encoding="utf-8")) for n in ("m.json", "whole.json"))
    assert doc["summary"]["outcomes"] == one["summary"]["outcomes"]
    assert (doc["summary"]["specs"], doc["summary"]["deselected"]) == (one["summary"]["specs"], 0)
    assert doc["exitstatus"] == one["exitstatus"] == 1 and doc["complete"] is True
    assert "c.sft.yaml" in (tmp_path / "m.html").read_text(encoding="utf-8")
    from conftest import load_schema, validate

    for name in ("part1.json", "m.json"):  # the shard record and the merge's keys are in the schema
        assert validate(json.loads((tmp_path / name).read_text(encoding="utf-8")), load_schema()) == [], name


def test_a_missing_shard_makes_the_merge_incomplete_and_is_said(sft, suite, tmp_path):
    for i in (1, 3):
        sft("run", suite, "--no-cache", "--shard", f"{i}/3", "--json", tmp_path / f"part{i}.json")
    merged = sft("report", "--merge", tmp_path / "part1.json", tmp_path / "part3.json", "--json", tmp_path / "m.json")
    assert "warning: shard 2/3: the merged report is marked incomplete" in merged.err
    doc = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert doc["complete"] is False and doc["missing"][0] == "shard 2/3"
    assert any(m.endswith("has no result") for m in doc["missing"])
    assert merged.code == 1  # a merge step in CI fails when a part is missing


def _killed(path, keep: int) -> None:
    """The file a run killed mid-way (SIGKILL, OOM, preemption) leaves: no exit status, not complete."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc.update(complete=False, exitstatus=None, specs=doc["specs"][:keep])
    path.write_text(json.dumps(doc), encoding="utf-8")


def test_a_part_that_never_finished_still_fails_the_merge_and_is_named(sft, suite, tmp_path):
    for i in (1, 2):
        sft("run", suite, "--no-cache", "-k", "not broken", "--shard", f"{i}/2", "--json", tmp_path / f"p{i}.json")
    failing = next(i for i in (1, 2) if any(s["outcome"] == "failed" for s in
                                            json.loads((tmp_path / f"p{i}.json").read_text())["specs"]))
    doc = json.loads((tmp_path / f"p{failing}.json").read_text())
    keep = 1 + [s["outcome"] for s in doc["specs"]].index("failed")  # killed just after its failed spec
    _killed(tmp_path / f"p{failing}.json", keep)
    merged = sft("report", "--merge", tmp_path / "p1.json", tmp_path / "p2.json", "--json", tmp_path / "m.json")
    doc = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert (doc["exitstatus"], doc["complete"], merged.code) == (1, False, 1)
    assert f"p{failing}.json is incomplete: its run did not finish" in merged.err


def test_shards_of_different_suites_do_not_merge_as_complete(sft, suite, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.sft.yaml").write_text(SPEC.format(loss="100.0", rest=""), encoding="utf-8")
    sft("run", suite, "--no-cache", "--shard", "1/2", "--json", tmp_path / "s1.json")
    sft("run", other, "--no-cache", "--shard", "2/2", "--json", tmp_path / "o2.json")
    merged = sft("report", "--merge", tmp_path / "s1.json", tmp_path / "o2.json", "--json", tmp_path / "m.json")
    assert "shards of different suites" in merged.err and merged.code == 1


@pytest.mark.parametrize("shard", [{}, {"index": 1, "count": "2", "specs": [], "sliced_out": 0},
                                   {"index": 1, "count": 2, "specs": [["x"]], "sliced_out": 0},
                                   {"index": 3, "count": 2, "specs": [], "sliced_out": 0},
                                   {"index": 1, "count": 10 ** 9, "specs": [], "sliced_out": 0}])  # forged
def test_a_malformed_shard_record_is_a_usage_error(sft, suite, tmp_path, shard):
    sft("run", suite, "--no-cache", "-k", "a", "--shard", "1/2", "--json", tmp_path / "p.json")
    doc = json.loads((tmp_path / "p.json").read_text(encoding="utf-8"))
    doc["shard"] = shard
    (tmp_path / "bad.json").write_text(json.dumps(doc), encoding="utf-8")
    merged = sft("report", "--merge", tmp_path / "bad.json", "--json", tmp_path / "m.json")
    assert merged.code == 4 and "malformed results file" in merged.err and "shard" in merged.err, merged.err


def test_a_shard_with_no_spec_in_it_passes_and_says_why(sft, tmp_path):
    folder = tmp_path / "specs"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.sft.yaml").write_text(SPEC.format(loss="100.0", rest=""), encoding="utf-8")
    empty = sft("run", folder, "--no-cache", "--shard", "3/3", "--json", tmp_path / "p3.json")
    assert empty.code == 0, empty.out
    assert "--shard 3/3: no spec falls in this slice (2 specs, 3 shards)" in empty.out
    # A -k that selects nothing is still pytest's "no tests ran" (5): only an empty slice is fine.
    assert sft("run", folder, "--no-cache", "-k", "nothing_has_this_name").code == 5
    for i in (1, 2):
        sft("run", folder, "--no-cache", "--shard", f"{i}/3", "--json", tmp_path / f"p{i}.json")
    sft("report", "--merge", *(tmp_path / f"p{i}.json" for i in (1, 2, 3)), "--json", tmp_path / "m.json")
    doc = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert (doc["exitstatus"], doc["complete"], doc["summary"]["specs"]) == (0, True, 2)


def test_the_slices_do_not_depend_on_the_order_files_are_found_in(sft, suite, tmp_path):
    forward = sft("run", "--co", "-q", suite, "--shard", "1/3").out
    backward = sft("run", "--co", "-q", *sorted(suite.glob("*.sft.yaml"), reverse=True), "--shard", "1/3").out
    ids = sorted(line for line in forward.splitlines() if "::" in line)
    assert ids and ids == sorted(line for line in backward.splitlines() if "::" in line)


def _doc(path, **changes) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc.update(changes)
    path.write_text(json.dumps(doc), encoding="utf-8")


def test_plain_merges_take_the_later_result_and_one_runs_order_of_exit_statuses(sft, tmp_path):
    folder = tmp_path / "specs"
    folder.mkdir()
    spec = folder / "a.sft.yaml"
    spec.write_text(SPEC.format(loss="0.0", rest=""), encoding="utf-8")
    sft("run", folder, "--no-cache", "--json", tmp_path / "failed.json")
    spec.write_text(SPEC.format(loss="100.0", rest=""), encoding="utf-8")
    sft("run", folder, "--no-cache", "--json", tmp_path / "fixed.json")
    # The same spec rerun: the later file's pass replaces the failure, so nothing failed.
    merged = sft("report", "--merge", tmp_path / "failed.json", tmp_path / "fixed.json", "--json", tmp_path / "m.json")
    assert merged.code == 0, merged.err
    again = sft("report", "--merge", tmp_path / "fixed.json", tmp_path / "fixed.json", "--json", tmp_path / "m.json")
    assert again.code == 0 and "is given twice: read once" in again.err
    # A part that exited 1 with nothing failing in it failed for a reason its reports do not hold.
    (tmp_path / "unexplained.json").write_text((tmp_path / "fixed.json").read_text(encoding="utf-8"),
                                               encoding="utf-8")
    _doc(tmp_path / "unexplained.json", exitstatus=1)
    unexplained = sft("report", "--merge", tmp_path / "unexplained.json", "--json", tmp_path / "m.json")
    assert unexplained.code == 1, unexplained.err
    for name, status in (("interrupted.json", 2), ("internal.json", 3)):
        (tmp_path / name).write_text((tmp_path / "fixed.json").read_text(encoding="utf-8"), encoding="utf-8")
        _doc(tmp_path / name, exitstatus=status, interrupted=status == 2)
    both = sft("report", "--merge", tmp_path / "internal.json", tmp_path / "interrupted.json", "--json",
               tmp_path / "m.json")
    doc = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert both.code == doc["exitstatus"] == 2 and doc["interrupted"] is True  # as Session.exitstatus: 2 first
