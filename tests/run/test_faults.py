"""Faults during a run: each stops its own spec with a clear error, the others run, reports are whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from sft_spec import hookimpl


class PoisonWeights:
    """Turns a weight into NaN right before training: the loss becomes NaN at the first step."""

    @hookimpl(wrapper=True)
    def sft_spec_make_trainer(self, item, run, examples):
        import torch

        trainer = yield
        if item.name == "poisoned":
            with torch.no_grad():
                next(p for p in run.model.parameters() if p.requires_grad).fill_(float("nan"))
        return trainer


class OutOfMemory:
    @hookimpl(tryfirst=True)
    def sft_spec_make_trainer(self, item, run, examples):
        if item.name == "oom":
            raise MemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_a_nan_loss_stops_the_spec_naming_the_step(sft, write_spec, one_answer_spec, tmp_path):
    folder = write_spec("poisoned.sft.yaml", one_answer_spec(method="full", lr=3e-3)).parent
    write_spec("healthy.sft.yaml", one_answer_spec(method="lora", epochs=30))
    result = sft("run", folder, "--json", tmp_path / "r.json", plugins=[PoisonWeights()])
    poisoned = result.recorder.by_id("poisoned")
    assert poisoned.outcome == "error"
    assert poisoned.error.kind == "nan", poisoned.error
    assert "the loss became nan at step 1" in poisoned.error.message
    assert result.recorder.by_id("healthy").outcome == "passed"
    assert result.code == 1
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["specs"]) == 2


def test_out_of_memory_is_reported_as_such(sft, write_spec, one_answer_spec):
    folder = write_spec("oom.sft.yaml", one_answer_spec()).parent
    result = sft("run", folder, plugins=[OutOfMemory()])
    report = result.recorder.reports[0]
    assert report.error.kind == "oom"
    assert report.error.message.startswith("out of memory in phase train")
    assert report.error.plugin == "OutOfMemory"


class StuckInTraining:
    """Holds the spec named a_slow at its first training step until the timer ends it: a hang, not a clock
    race (the timer interrupts the wait, as it would a training loop)."""

    @hookimpl
    def sft_spec_run_progress(self, item, phase, step, total, loss):
        if item.name == "a_slow" and phase == "train":
            threading.Event().wait(120)  # never set: the timer ends it (a broken timer fails, not hangs)


def test_timeout_ends_a_long_spec_and_the_next_one_runs(sft, write_spec, one_answer_spec, tmp_path):
    folder = write_spec("a_slow.sft.yaml", one_answer_spec(method="full", epochs=100000, lr=3e-3)).parent
    write_spec("b_quick.sft.yaml", one_answer_spec(method="lora", epochs=2))
    result = sft("run", folder, "--timeout", "2", "--junitxml", tmp_path / "j.xml", plugins=[StuckInTraining()])
    slow = result.recorder.by_id("a_slow")
    assert slow.outcome == "error" and slow.error.kind == "timeout"
    assert "--timeout=2s" in slow.error.message
    assert slow.metrics.get("steps") is None  # it never finished its 100000 epochs
    # The next spec ran to its own verdict (two epochs teach nothing: it fails, but it is no error).
    assert result.recorder.by_id("b_quick").outcome == "failed"
    assert (tmp_path / "j.xml").read_text().count("<testcase") == 2


class SlowSeeds:
    """Records the seeds whose training started and holds each one after the first for 1 s: the eight seeds
    need 7 s or more, whatever the machine's speed, and the first one none of it."""

    def __init__(self):
        self.seeds = []

    @hookimpl
    def sft_spec_run_progress(self, item, phase, step, total, loss):
        seed = item.spec.training.get("seed")
        if phase == "train" and seed not in self.seeds:
            self.seeds.append(seed)
            if len(self.seeds) > 1:
                time.sleep(1)


def test_timeout_bounds_a_repeated_spec_with_all_its_seeds_together(sft, write_spec, one_answer_spec):
    # Each seed once restarted the timer: eight seeds that each fit under --timeout all ran, far past it.
    text = one_answer_spec(method="full", epochs=3, lr=3e-3) + "repeat: {seeds: [1, 2, 3, 4, 5, 6, 7, 8]}\n"
    path = write_spec("repeated.sft.yaml", text)
    slow = SlowSeeds()
    result = sft("run", path, "--timeout", "4", "--no-cache", plugins=[slow])
    report = result.recorder.by_id("repeated")
    assert report.outcome == "error" and report.error.kind == "timeout", report.error
    assert "--timeout=4s" in report.error.message and "seeds run:" in report.error.message, report.error.message
    assert 2 <= len(slow.seeds) < 8, (slow.seeds, report.error.message)


#: A plugin that touches a marker file when the spec named in it starts training: the event a test waits on.
MARKER_PLUGIN = """\
import os, pathlib
from sft_spec import hookimpl

@hookimpl
def sft_spec_run_progress(item, phase, step, total, loss):
    if phase == "train" and step >= 1 and item.name == "b_long":
        pathlib.Path(os.environ["MARKER"]).touch()
"""


def test_ctrl_c_stops_cleanly_with_exit_2_and_reports_what_finished(write_spec, one_answer_spec, tmp_path):
    folder = tmp_path / "specs"
    write_spec("a_quick.sft.yaml", one_answer_spec(method="lora"), folder=folder)
    write_spec("b_long.sft.yaml", one_answer_spec(method="full", epochs=100000, lr=3e-3), folder=folder)
    (tmp_path / "marker_plugin.py").write_text(MARKER_PLUGIN, encoding="utf-8")
    results, marker = tmp_path / "results.json", tmp_path / "b_long.training"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sft_spec", "run", str(folder), "--json", str(results), "-p", "marker_plugin",
         "--html", str(tmp_path / "r.html")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tmp_path), "MARKER": str(marker)},
        # A pytest-xdist worker ignores SIGINT, and a child inherits an ignored signal: Ctrl-C as a user's.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while not marker.exists():  # the event: the first spec has finished and the second is training
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "KeyboardInterrupt" in out
    data = json.loads(results.read_text())
    outcomes = {s["name"]: s["outcome"] for s in data["specs"]}
    assert outcomes == {"a_quick": "passed", "b_long": "interrupted"}
    assert data["interrupted"] is True
    assert "b_long" in (tmp_path / "r.html").read_text()
    assert "Traceback" not in out


@pytest.mark.parametrize("kill_at", [1, 5, 20])
def test_a_process_killed_while_writing_leaves_a_whole_file(tmp_path, kill_at):
    target = tmp_path / "report.json"
    writer = (
        "import json, sys; from pathlib import Path; from sft_spec_plugins.common.files import atomic_write_text\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    atomic_write_text(Path(sys.argv[1]), json.dumps({'i': i, 'pad': 'x' * 2_000_000}))\n"
        "    print(i, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(target)], stdout=subprocess.PIPE, text=True)
    # The event: the writer says it replaced the file kill_at times (a blocking read, no polling), and it is
    # writing again as the kill lands.
    for line in proc.stdout:
        if int(line) >= kill_at:
            break
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.stdout.close()
    proc.wait()
    data = json.loads(target.read_text())  # the old file or the new one, never half of one
    assert data["i"] >= kill_at and len(data["pad"]) == 2_000_000


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "1e300"])
def test_a_timeout_no_timer_can_keep_is_a_usage_error(sft, write_spec, one_answer_spec, value):
    result = sft("run", write_spec("t.sft.yaml", one_answer_spec()), "--timeout", value)
    assert result.code == 4 and "--timeout" in result.err and "seconds above 0" in result.err, result.err


def test_a_timeout_does_not_cut_the_library_imports_short(write_spec, one_answer_spec, tmp_path):
    # The timer once ran from the spec's start: a --timeout shorter than importing torch (seconds, once per
    # process) ended the first spec inside the import and left torch half-imported, so every later spec of
    # the process timed out in its import too.
    folder = write_spec("a.sft.yaml", one_answer_spec(epochs=1)).parent
    write_spec("b.sft.yaml", one_answer_spec(epochs=1))
    done = subprocess.run([sys.executable, "-m", "sft_spec", "run", str(folder), "--timeout", "1", "--no-cache",
                           "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    specs = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["specs"]
    phases = [(s["name"], (s.get("error") or {}).get("phase")) for s in specs]
    assert ("b", "import") not in phases and ("a", "import") not in phases, (phases, done.stdout)
    assert [s["name"] for s in specs if s["outcome"] in ("passed", "failed")], (phases, done.stdout)


class OwnRun:
    """A plugin that runs a spec its own way: it reports no progress, and it takes its time."""

    @hookimpl(tryfirst=True)
    def sft_spec_run_spec(self, item, session):
        if item.name == "a_own":
            time.sleep(30)


def test_a_plugins_own_run_is_bounded_too_and_the_next_spec_runs(sft, write_spec, one_answer_spec):
    # Armed at the first progress event, the timer never started for a run that reports none.
    folder = write_spec("a_own.sft.yaml", one_answer_spec(epochs=1)).parent
    write_spec("b_next.sft.yaml", one_answer_spec(epochs=1))
    result = sft("run", folder, "--timeout", "2", "--no-cache", plugins=[OwnRun()])
    own = result.recorder.by_id("a_own")
    assert own.outcome == "error" and own.error.kind == "timeout", own.error
    assert result.recorder.by_id("b_next").outcome in ("passed", "failed")
