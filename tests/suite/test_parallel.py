"""`sft-spec run -n N`: the same reports as a serial run, in collection order; a crashed worker is one error."""

from __future__ import annotations

import re

import pytest

from sft_spec.errors import UsageError
from sft_spec_plugins.suite.workers import worker_count

SPEC = """\
model: builtin:tiny-gemma
method: {method}
lora: {{r: 16, lora_alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
training: {{num_train_epochs: 8, learning_rate: {lr}}}
data:
  conversations:
    - - {{role: user, content: 微调测试}}
      - {{role: assistant, content: 我学会了}}
expect:
  - prompt: 微调测试
    not_contains: zzz
  - prompt: 你好
    equals: zzz
"""

CRASHING_PLUGIN = """\
import os
import signal

from sft_spec import hookimpl


@hookimpl(tryfirst=True)
def sft_spec_load_model(item, config):
    # Only in a worker: killed as the kernel's OOM killer would.
    if item.name == "crash" and os.environ.get("SFT_SPEC_WORKER"):
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_parallel_reports_equal_serial_and_survive_a_crash(tmp_path, monkeypatch, sft):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers get the parent's sys.path
    (tmp_path / "crashy.py").write_text(CRASHING_PLUGIN, encoding="utf-8")
    specs = tmp_path / "specs"
    specs.mkdir()
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'p'\n", encoding="utf-8")  # the suite's root
    (specs / "a-full.sft.yaml").write_text(SPEC.format(method="full", lr=3e-3), encoding="utf-8")
    (specs / "b-lora.sft.yaml").write_text(SPEC.format(method="lora", lr=1e-2), encoding="utf-8")
    (specs / "crash.sft.yaml").write_text(SPEC.format(method="lora", lr=1e-2), encoding="utf-8")

    serial = sft("run", "specs", "-p", "crashy", "--no-cache", "-v")
    parallel = sft("run", "specs", "-p", "crashy", "--no-cache", "-v", "-n", "2")
    assert [r.nodeid for r in parallel.recorder.reports] == [r.nodeid for r in serial.recorder.reports]
    assert serial.code == parallel.code == 1  # expect[1] fails everywhere
    for one, other in zip(serial.recorder.reports[:2], parallel.recorder.reports[:2], strict=True):
        assert one.outcome == other.outcome == "failed"
        assert [(c.nodeid, c.outcome, c.answer) for c in one.cases] == [
            (c.nodeid, c.outcome, c.answer) for c in other.cases]
        assert other.losses == pytest.approx(one.losses, rel=1e-3)
    crashed = parallel.recorder.reports[2]
    assert crashed.outcome == "error"
    assert crashed.error.message == "worker crashed: exit code -9"
    assert serial.recorder.reports[2].outcome == "failed"  # the same spec runs fine outside a worker
    assert "ERROR specs/crash.sft.yaml::crash - worker crashed: exit code -9" in parallel.out
    # Not a terminal, -v: plain progress lines (workers send theirs to the main process).
    for out in (serial.out, parallel.out):
        assert re.search(r"^  specs/b-lora.sft.yaml::b-lora step 4/8 loss \S+ eta \d+s$", out, re.M), out
        assert re.search(r"^  specs/b-lora.sft.yaml::b-lora step 8/8 loss \S+ eta 0s$", out, re.M), out


def test_worker_count():
    assert worker_count("2", 5, []) == 2
    assert worker_count("8", 3, []) == 3  # never more workers than specs
    assert worker_count("auto", 8, ["0", "1", "2"]) == 3  # one per GPU
    with pytest.raises(UsageError):
        worker_count("many", 3, [])
    with pytest.raises(UsageError):
        worker_count("-1", 3, [])


def test_bad_n_is_a_usage_error(sft, write_spec, one_answer_spec):
    path = write_spec("one.sft.yaml", one_answer_spec())
    result = sft("run", path, "-n", "lots")
    assert result.code == 4
    assert "-n expects a number or 'auto'" in result.err
