"""`launcher: {type: accelerate}`: two CPU processes (gloo DDP) learn what one process learns."""

from __future__ import annotations

SPEC = """\
model: builtin:tiny-gemma
method: lora
lora: {r: 16, lora_alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}
training: {num_train_epochs: 30, learning_rate: 1.0e-2, per_device_train_batch_size: 8}
data:
  conversations:
    - - {role: user, content: 微调测试}
      - {role: assistant, content: 我学会了}
expect:
  - prompt: 微调测试
    equals: 我学会了
    before: {not_equals: 我学会了}
checks:
  loss_decreased: true
"""


def test_two_processes_pass_like_one(sft, write_spec, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    one = write_spec("one.sft.yaml", SPEC)
    two = write_spec("two.sft.yaml", SPEC + "launcher: {type: accelerate, num_processes: 2}\n")
    single = sft("run", one, "--no-cache", "--device", "cpu")
    launched = sft("run", two, "--no-cache", "--device", "cpu")
    assert single.code == 0, single.out
    assert launched.code == 0, launched.out + launched.err
    report = launched.recorder.reports[0]
    assert report.metrics["world_size"] == 2
    assert "trained with accelerate launch, 2 processes" in report.notes
    assert [(c.outcome, c.answer) for c in report.cases] == [
        (c.outcome, c.answer) for c in single.recorder.reports[0].cases]


def test_launcher_option_and_bad_launcher(sft, write_spec):
    bad = write_spec("bad.sft.yaml", SPEC + "launcher: {type: torchrun}\n")
    result = sft("validate", bad)
    assert result.code == 1
    assert "launcher.type" in result.out and "accelerate" in result.out
    good = write_spec("good.sft.yaml", SPEC)
    assert sft("run", good, "--launcher", "deepspeed").code == 4
