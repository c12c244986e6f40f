"""`sft-spec run --lf`: only what failed last time runs again; all when nothing failed."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sft_spec_plugins.collect.lastfailed import lastfailed_path, read_lastfailed

SPEC = """\
model: builtin:tiny-gemma
method: lora
lora: {{r: 8, target_modules: [q_proj, v_proj]}}
training: {{num_train_epochs: 1, learning_rate: 1.0e-3}}
data:
  conversations:
    - - {{role: user, content: 微调测试}}
      - {{role: assistant, content: 我学会了}}
expect:
  - prompt: 微调测试
    not_contains: zzz
  - prompt: 你好
    {second}: zzz
"""


def _case_ids(result) -> list[str]:
    return [c.nodeid for r in result.recorder.reports for c in r.cases]


def test_lf_reruns_failures_then_everything(tmp_path, monkeypatch, sft):
    monkeypatch.chdir(tmp_path)
    specs = tmp_path / "specs"
    specs.mkdir()
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'p'\n", encoding="utf-8")  # the suite's root
    (specs / "a.sft.yaml").write_text(SPEC.format(second="equals"), encoding="utf-8")  # expect[1] fails
    (specs / "b.sft.yaml").write_text(SPEC.format(second="not_contains"), encoding="utf-8")
    (specs / "bad.sft.yaml").write_text("model: builtin:tiny-gemma\nmodle: x\n", encoding="utf-8")

    first = sft("run", "specs")
    assert first.code == 1
    cache = lastfailed_path(Path(os.environ["SFT_SPEC_CACHE"]), tmp_path)
    assert set(read_lastfailed(cache)) == {"specs/a.sft.yaml::a::expect[1]", "specs/bad.sft.yaml"}
    assert json.loads(cache.read_text(encoding="utf-8"))["cwd"] == str(tmp_path.resolve())

    again = sft("run", "specs", "--lf")
    assert "run-last-failure: rerun previous 2 failures" in again.out
    assert _case_ids(again) == ["specs/a.sft.yaml::a::expect[1]"]
    assert again.recorder.reports[0].outcome == "error"  # the broken file is still reported

    (specs / "bad.sft.yaml").unlink()
    (specs / "a.sft.yaml").write_text(SPEC.format(second="not_contains"), encoding="utf-8")
    fixed = sft("run", "specs", "--lf")
    assert fixed.code == 0
    assert _case_ids(fixed) == ["specs/a.sft.yaml::a::expect[1]"]
    assert "1 deselected" in fixed.out
    # The file that broke is gone from the run: its entry stays until it collects again or is listed.
    assert "specs/a.sft.yaml::a::expect[1]" not in read_lastfailed(cache)

    (specs / "bad.sft.yaml").write_text(SPEC.format(second="not_contains"), encoding="utf-8")
    sft("run", "specs")
    assert read_lastfailed(cache) == {}
    everything = sft("run", "specs", "--lf")
    assert "run-last-failure: no previously failed tests, not deselecting items." in everything.out
    assert len(_case_ids(everything)) == 6


def test_corrupt_lastfailed_file_counts_as_nothing_failed(tmp_path):
    path = tmp_path / "lastfailed.json"
    path.write_text("{not json", encoding="utf-8")
    assert read_lastfailed(path) == {}
    path.write_text(json.dumps({"lastfailed": ["x"]}), encoding="utf-8")
    assert read_lastfailed(path) == {}
