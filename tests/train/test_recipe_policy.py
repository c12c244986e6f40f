"""Every TRL and peft setting is honoured, refused with a located error, or changed with a note: none is
dropped in silence, and a value TRL would accept and then fail on is an error at its own key."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml
from conftest import GEMMA_ONE_ANSWER

from sft_spec_plugins.train import recipe_policy

REFERENCE = GEMMA_ONE_ANSWER.format(method="lora", epochs=2, lr=1e-2)
KINDS = {"passed", "path", "sft-spec", "managed", "refused"}


def spec_with(training: dict | None = None, lora: dict | None = None, top: str = "", epochs: int = 2,
              question: str = "微调测试") -> str:
    """The tiny reference recipe with more training/lora fields, as YAML text (dedented)."""
    import textwrap

    data = yaml.safe_load(textwrap.dedent(GEMMA_ONE_ANSWER.format(method="lora", epochs=epochs, lr=1e-2)))
    data["training"].update(training or {})
    data["lora"].update(lora or {})
    data["data"]["conversations"][0][0]["content"] = data["expect"][0]["prompt"] = question
    return top + yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def test_every_field_of_the_installed_trl_and_peft_is_classified():
    from peft import LoraConfig
    from trl import SFTConfig

    for cls, table in ((SFTConfig, recipe_policy.TRAINING), (LoraConfig, recipe_policy.LORA)):
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields - set(table) == set(), (f"classify these {cls.__name__} fields in "
                                           "src/sft_spec_plugins/train/recipe_policy.py")
        assert {kind for kind, _ in table.values()} <= KINDS
        assert all(why for kind, why in table.values() if kind != "passed")  # every non-plain field says why


@pytest.mark.parametrize("section,key,value,message", [
    ("training", "model_init_kwargs", {"attn_implementation": "eager"}, "the model is loaded from model:"),
    ("training", "trust_remote_code", True, "set model.trust_remote_code"),
    ("training", "hub_model_id", "me/model", "a spec may not publish"),
    ("training", "resume_from_checkpoint", "ckpt", "each run trains from the base model"),
    ("lora", "eva_config", {"rho": 2.0}, "initialisation pass over the training data"),
    ("lora", "init_lora_weights", "eva", "initialisation pass over the training data"),
])
def test_refused_settings_are_errors_at_their_key(sft, write_spec, section, key, value, message):
    text = spec_with(**{section: {key: value}})
    result = sft("validate", write_spec("refused.sft.yaml", text))
    assert result.code == 1
    line = next(i for i, row in enumerate(text.splitlines(), 1) if row.strip().startswith(f"{key}:"))
    located = rf"refused\.sft\.yaml:{line}:\d+: {section}\.{key}: .*{re.escape(message)}"
    assert re.search(located, result.out), result.out


def test_quantization_without_qlora_is_refused(sft, write_spec):
    result = sft("validate", write_spec("q.sft.yaml", spec_with(top="quantization: {load_in_8bit: true}\n")))
    assert result.code == 1
    assert "q.sft.yaml:1:1: quantization: quantization applies to method: qlora; with method: lora it would be " \
           "ignored" in result.out


@pytest.mark.parametrize("key,value", [("save_strategy", "steps"), ("dataset_text_field", "text"),
                                       ("eval_strategy", "steps"), ("disable_tqdm", False)])
def test_managed_settings_are_noted_in_every_report(sft, write_spec, key, value, tmp_path):
    import json

    path = write_spec("managed.sft.yaml", spec_with(training={key: value}))
    result = sft("run", path, "--no-cache", "--json", tmp_path / "r.json")
    (report,) = json.loads((tmp_path / "r.json").read_text())["specs"]
    note = next(n for n in report["notes"] if f"training.{key} is not used as written" in n)
    assert re.search(r"managed\.sft\.yaml:\d+:\d+: note: ", note) and recipe_policy.why("training", key) in note
    assert note in result.out


def test_completion_only_loss_false_trains_the_prompt_too(sft, write_spec):
    result = sft("run", write_spec("full.sft.yaml", spec_with(training={"completion_only_loss": False})), "--no-cache")
    report = result.recorder.reports[0]
    assert "微调测试" in report.mask.trained_text and "我学会了" in report.mask.trained_text
    assert any("completion_only_loss: False is read as format.collator: full" in n for n in report.notes)
    clash = spec_with(training={"assistant_only_loss": True}).replace("expect:", "format: {collator: full}\nexpect:")
    result = sft("validate", write_spec("clash.sft.yaml", clash))
    assert "asks for the collator 'assistant_only', and format.collator is 'full': keep one" in result.out


def test_report_to_tensorboard_leaves_event_files_and_network_loggers_need_consent(sft, write_spec, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    path = write_spec("tb.sft.yaml", spec_with(training={"report_to": ["tensorboard"]}, epochs=30))
    result = sft("run", path, "--no-cache")
    assert result.code == 0, result.out
    events = list((tmp_path / ".sft-spec" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, result.out  # kept, though the run's own output folder was temporary
    assert "TensorBoard: 1 run logged: tensorboard --logdir" in result.out
    from tensorboardX.event_file_writer import EventFileWriter  # noqa: F401 - the package that wrote them

    remote = sft("validate", write_spec("wandb.sft.yaml", spec_with(training={"report_to": ["wandb"]})))
    assert remote.code == 1
    assert "training.report_to: report_to 'wandb' sends the run to a network service; pass " \
           "--allow-network-loggers to allow it" in remote.out


def _just_outside(bound) -> list:
    """The values next to a bound that it refuses: the bound itself when exclusive, one past it when not."""
    least, greatest, _ = bound
    out = []
    if least is not None:
        out.append(least[0] if isinstance(least, tuple) else least - 1)
    if greatest is not None:
        out.append(greatest[0] if isinstance(greatest, tuple) else greatest + 1)
    return out


def _bad_values():
    from sft_spec_plugins.train.recipe_fields import BOUNDS

    table = [(section, key, value) for (section, key), bound in BOUNDS.items() for value in _just_outside(bound)]
    return table + [("training", "learning_rate", float("nan")), ("training", "max_length", -5)]


BAD_VALUES = _bad_values()


@pytest.mark.parametrize("section,key,value", BAD_VALUES, ids=lambda v: str(v))
def test_values_training_would_reject_are_errors_at_their_own_key(sft, write_spec, section, key, value):
    """The class, generated from BOUNDS: the values just outside every bound are load-time errors, each at
    the key it is about (a dropout of 1.5, a seed of -1, Adam's beta1 of 1, a batch of 0, ...)."""
    text = spec_with(**{section: {key: value}})
    result = sft("validate", write_spec("bad.sft.yaml", text))
    assert result.code == 1, result.out
    line = next(i for i, row in enumerate(text.splitlines(), 1) if row.strip().startswith(f"{key}:"))
    assert re.search(rf"bad\.sft\.yaml:{line}:\d+: {section}\.{key}: .* cannot train: ", result.out), result.out


def _inclusive_edges():
    from sft_spec_plugins.train.recipe_fields import BOUNDS

    return [(s, k, bound[0]) for (s, k), bound in BOUNDS.items()
            if bound[0] is not None and not isinstance(bound[0], tuple) and (s, k) != ("training", "max_length")]


@pytest.mark.parametrize("section,key,value", _inclusive_edges(), ids=lambda v: str(v))
def test_values_at_an_inclusive_bound_are_accepted(sft, write_spec, section, key, value):
    result = sft("validate", write_spec("ok.sft.yaml", spec_with(**{section: {key: value}})))
    assert "cannot train" not in result.out, result.out


@pytest.mark.parametrize("training,message", [
    ({"lr_scheduler_kwargs": "../outside.json"}, "training.lr_scheduler_kwargs: expected a mapping, got string"),
    ({"dataset_kwargs": "/etc/passwd"}, "training.dataset_kwargs: expected a mapping, got string"),
    ({"dataloader_prefetch_factor": 2}, "dataloader_prefetch_factor needs dataloader_num_workers > 0"),
    ({"optim": "galore_adamw"}, "optim: 'galore_adamw' needs the galore_torch package, which is not installed"),
    ({"use_liger_kernel": True}, "needs the liger_kernel package, which is not installed"),
])
def test_settings_training_would_crash_on_are_refused_at_their_key(sft, write_spec, training, message):
    key = next(iter(training))
    text = spec_with(training=training)
    result = sft("validate", write_spec("bad.sft.yaml", text))
    line = next(i for i, row in enumerate(text.splitlines(), 1) if row.strip().startswith(f"{key}:"))
    assert result.code == 1 and message in result.out and f"bad.sft.yaml:{line}:" in result.out, result.out


def test_a_crash_while_training_is_located_at_the_recipe_key_not_the_first_line(sft, write_spec):
    text = spec_with(training={"lr_scheduler_kwargs": {"bogus": 1}})
    report = sft("run", write_spec("crash.sft.yaml", text), "--no-cache").recorder.reports[0]
    line = next(i for i, row in enumerate(text.splitlines(), 1) if row.strip().startswith("lr_scheduler_kwargs:"))
    assert report.outcome == "error" and "unexpected keyword argument 'bogus'" in report.error.message
    assert report.error.location.startswith(f"{report.path}:{line}:"), report.error.location


def test_settings_a_recipe_does_not_use_are_noted(sft, write_spec):
    text = spec_with(training={}).replace("method: lora", "method: full") + \
        "format: {collator: full, response_template: ZZZ}\n"
    report = sft("run", write_spec("unused.sft.yaml", text), "--no-cache").recorder.reports[0]
    assert any("lora: is not used by method: full" in n for n in report.notes), report.notes
    assert any("format.response_template is used by the completion_only collator only" in n for n in report.notes)


@pytest.mark.parametrize("model", ["{id: builtin:tiny-gemma, revision: main}",
                                   "{id: builtin:tiny-gemma, gguf_file: x.gguf}"])
def test_model_settings_that_do_not_apply_to_a_builtin_model_are_refused(sft, write_spec, model):
    text = spec_with(training={}).replace("model: builtin:tiny-gemma", f"model: {model}")
    result = sft("validate", write_spec("m.sft.yaml", text))
    assert result.code == 1 and "does not apply to builtin:tiny-gemma" in result.out, result.out


def test_an_invalid_quantization_value_is_the_specs_error_not_the_machines(sft, write_spec):
    text = spec_with(top="quantization: {bnb_4bit_quant_type: nf5}\n").replace("method: lora", "method: qlora")
    result = sft("validate", write_spec("q.sft.yaml", text))
    assert result.code == 1
    assert "q.sft.yaml:1:16: quantization.bnb_4bit_quant_type: invalid value for bnb_4bit_quant_type: 'nf5'. " \
           "Did you mean: nf4?" in result.out
    assert "4-bit" not in result.out and "fell back" not in result.out


def test_target_modules_the_model_lacks_are_an_error_at_the_key(sft, write_spec):
    text = spec_with(lora={"target_modules": ["q_proj", "query_key_value"]})
    result = sft("run", write_spec("t.sft.yaml", text), "--no-cache")
    report = result.recorder.reports[0]
    line = next(i for i, row in enumerate(text.splitlines(), 1) if row.strip().startswith("target_modules:"))
    assert report.outcome == "error" and report.error.location.startswith(f"{report.path}:{line}:"), report.error
    assert "its linear layers are" in report.error.message and "q_proj" in report.error.message


def test_sampling_at_temperature_zero_is_an_error_at_the_key(sft, write_spec):
    text = spec_with(top="generation: {do_sample: true, temperature: 0.0}\n")
    result = sft("validate", write_spec("g.sft.yaml", text))
    assert "g.sft.yaml:1:31: generation.temperature: temperature 0.0 with do_sample: true cannot sample" in result.out


def test_truncation_keep_end_keeps_the_answer(sft, write_spec):
    long_prompt = "很长的问题" * 60  # 300 characters, 900 byte tokens: the answer is past max_length=256
    text = spec_with(training={"max_length": 256, "truncation_mode": "keep_end"}, epochs=30, question=long_prompt)
    kept = sft("run", write_spec("end.sft.yaml", text), "--no-cache").recorder.reports[0]
    # It trained on the answer (at generation the model sees the whole prompt, not the end it trained on).
    assert kept.error is None and kept.mask.trained_text.startswith("我学会了")
    assert kept.losses[-1] < kept.losses[0] / 4
    assert any("keep_end: its end is kept" in n for n in kept.notes), kept.notes
    start = sft("run", write_spec("start.sft.yaml", text.replace("keep_end", "keep_start")), "--no-cache")
    assert "trains no token of conversation 0" in start.recorder.reports[0].error.message


class PoisonWeights:
    from sft_spec import hookimpl

    @hookimpl(wrapper=True)
    def sft_spec_make_trainer(self, item, run, examples):
        import torch

        trainer = yield
        with torch.no_grad():
            next(p for p in run.model.parameters() if p.requires_grad).fill_(float("nan"))
        return trainer


def test_a_nan_loss_stops_the_spec_even_with_logging_off(sft, write_spec):
    text = spec_with(training={"logging_strategy": "no"}).replace("method: lora", "method: full")
    result = sft("run", write_spec("quiet.sft.yaml", text), "--no-cache", plugins=[PoisonWeights()])
    report = result.recorder.reports[0]
    assert report.outcome == "error" and report.error.kind == "nan"
    assert "the loss became nan at step 1" in report.error.message
