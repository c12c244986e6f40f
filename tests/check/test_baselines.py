"""Loss baselines: a recorded curve passes on a repeat, a changed effective learning rate fails it, and a
changed recipe or library version reports the baseline as stale with what changed."""

from __future__ import annotations

import pytest
import yaml

from sft_spec import hookimpl
from sft_spec_plugins.check.baselines import compare_curves, fingerprint_changes, tolerances
from sft_spec_plugins.common import recorded

SPEC = """\
    model: builtin:tiny-gemma
    method: lora
    lora: {{r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}}
    training: {{num_train_epochs: 6, learning_rate: {lr}}}
    data:
      conversations:
        - - {{role: user, content: 微调测试}}
          - {{role: assistant, content: 我学会了}}
    checks:
      loss_baseline: true
"""


class TripleLearningRate:
    """A harness regression: the trainer runs a different learning rate than the recipe says."""

    @hookimpl(wrapper=True)
    def sft_spec_make_trainer(self, item, run, examples):
        trainer = yield
        trainer.args.learning_rate *= 3
        return trainer


def test_baseline_records_matches_and_catches_changes(sft, write_spec, tmp_path, monkeypatch):
    path = write_spec("curve.sft.yaml", SPEC.format(lr=1e-2))
    first = sft("run", path, "--update-baselines")
    assert first.code == 0, first.out
    assert "loss baselines: 1 recorded" in first.out
    entry = yaml.safe_load((tmp_path / "__baselines__" / "curve.yaml").read_text(encoding="utf-8"))["curve"]
    assert entry["losses"] == first.recorder.reports[0].losses
    assert entry["fingerprint"]["settings"]["training"]["learning_rate"] == 0.01

    again = sft("run", path, "--no-cache")
    assert again.code == 0, again.out

    faster = sft("run", path, "--no-cache", plugins=[TripleLearningRate()])
    assert faster.code == 1
    message = faster.recorder.reports[0].training_checks[0].checks[0].message
    assert "steps outside rtol=0.05, atol=0.01" in message and "mean loss" in message

    path.write_text(path.read_text(encoding="utf-8").replace("learning_rate: 0.01", "learning_rate: 0.02"),
                    encoding="utf-8")
    changed = sft("run", path, "--no-cache")
    assert changed.code == 1
    assert "stale baseline: training.learning_rate 0.01 -> 0.02; rerun with --update-baselines" in changed.out

    path.write_text(path.read_text(encoding="utf-8").replace("learning_rate: 0.02", "learning_rate: 0.01"),
                    encoding="utf-8")
    versions = {**recorded.library_versions(), "trl": "99.0.0"}
    monkeypatch.setattr(recorded, "library_versions", lambda: versions)
    upgraded = sft("run", path, "--no-cache")
    assert upgraded.code == 1
    old_trl = entry["fingerprint"]["versions"]["trl"]
    assert f"stale baseline: trl {old_trl} -> 99.0.0; rerun with --update-baselines" in upgraded.out
    assert "loss baselines: 1 stale" in upgraded.out


def test_missing_baseline_says_how_to_record(sft, write_spec):
    result = sft("run", write_spec("none.sft.yaml", SPEC.format(lr=1e-2).replace("6,", "1,")), "--no-cache")
    assert result.code == 1
    assert "no loss baseline recorded for none" in result.out and "--update-baselines" in result.out


@pytest.mark.parametrize("curve,ok", [
    ([2.0, 1.0, 0.5], True),
    ([2.05, 1.02, 0.5], True),  # within 5% per step and in the mean
    ([2.0, 1.2, 0.5], False),  # one step 20% off
    ([2.0, 1.0], False),  # a step missing
    ([2.0, float("nan"), 0.5], False),
])
def test_curve_comparison(curve, ok):
    passed, message = compare_curves(curve, [2.0, 1.0, 0.5], tolerances(True))
    assert passed is ok, message


def test_mean_drift_alone_fails():
    # Every step inside a loose per-step tolerance, but all drifting the same way.
    passed, message = compare_curves([2.2, 1.1, 0.55], [2.0, 1.0, 0.5], tolerances({"rtol": 0.2, "mean_drift": 0.05}))
    assert not passed and "drift" in message


def test_fingerprint_changes_name_fields():
    old = {"versions": {"trl": "1.16.0"}, "settings": {"training": {"seed": 1}}, "device": "cpu"}
    new = {"versions": {"trl": "1.17.0"}, "settings": {"training": {"seed": 1}}, "device": "cuda"}
    assert fingerprint_changes(old, new) == ["device cpu -> cuda", "trl 1.16.0 -> 1.17.0"]


def test_loss_baseline_arguments_are_validated(sft, write_spec):
    text = SPEC.format(lr=1e-2).replace("loss_baseline: true", "loss_baseline: {rtol: 0.1, tolerance: 2}")
    result = sft("validate", write_spec("bad.sft.yaml", text))
    assert result.code == 1
    assert "loss_baseline: unknown key(s) tolerance" in result.out


def test_bitsandbytes_version_is_fingerprinted_only_for_recipes_that_use_it():
    from sft_spec_plugins.check.baselines import _bitsandbytes_version

    assert _bitsandbytes_version({"training": {"optim": "adamw_torch"}}) == {}
    assert _bitsandbytes_version({"training": {"optim": "adamw_torch_8bit"}}) == {}  # torchao's
    assert list(_bitsandbytes_version({"training": {"optim": "adamw_8bit"}})) == ["bitsandbytes"]
    assert list(_bitsandbytes_version({"quantization": "4-bit nf4", "training": {}})) == ["bitsandbytes"]
