"""One spec never changes another's result: LoRA specs share one loaded base model, and whatever a spec
does to it (train a module peft keeps on unload, rewrite the base weights, change the tokenizer), the next
spec starts from the model as it was loaded. The property: a spec's result is the same alone and after
any of these specs."""

from __future__ import annotations

import pytest
from conftest import GEMMA_ONE_ANSWER

from sft_spec import hookimpl

PROBE = GEMMA_ONE_ANSWER.format(method="lora", epochs=8, lr=1e-2)
CHATML_LIKE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>\n{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CONTAMINATORS = {
    # peft's unload() keeps the trained copy of a modules_to_save module in the base model.
    "modules_to_save": PROBE.replace("target_modules: [q_proj, k_proj, v_proj, o_proj]",
                                     "target_modules: [q_proj, v_proj], modules_to_save: [lm_head]"),
    # PiSSA initialises the adapter from the base weights' SVD and rewrites the base weights with the rest.
    "pissa": PROBE.replace("target_modules: [q_proj, k_proj, v_proj, o_proj]",
                           "target_modules: [q_proj, v_proj], init_lora_weights: pissa"),
    # TRL sets these on the tokenizer it is given: here on this spec's own copy.
    "eos_token": PROBE.replace("per_device_train_batch_size: 8", "per_device_train_batch_size: 8, "
                               "eos_token: <end_of_turn>"),
    # An EOS the base model's answer contains: its base answer stops there, and must not be the probe's.
    "eos_token_in_the_answer": PROBE.replace("per_device_train_batch_size: 8", "per_device_train_batch_size: 8, "
                                             "eos_token: p"),
    "chat_template_path": PROBE.replace("per_device_train_batch_size: 8", "per_device_train_batch_size: 8, "
                                        "chat_template_path: other.jinja"),
    # The Trainer switches checkpointing on in the base model and hooks its embeddings.
    "activation_checkpointing": PROBE.replace("per_device_train_batch_size: 8", "per_device_train_batch_size: 8, "
                                              "activation_checkpointing: true"),
    "full": GEMMA_ONE_ANSWER.format(method="full", epochs=8, lr=3e-3),
    "qlora": GEMMA_ONE_ANSWER.format(method="qlora", epochs=8, lr=1e-2),
}


def outcome(report) -> tuple:
    return ([(c.base_answer, c.answer) for c in report.expectations], [round(x, 6) for x in report.losses])


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    from conftest import Recorder

    from sft_spec.cli import main

    folder = tmp_path_factory.mktemp("alone")
    import textwrap

    (folder / "b_probe.sft.yaml").write_text(textwrap.dedent(PROBE), encoding="utf-8")
    recorder = Recorder()
    assert main(["run", str(folder), "--no-cache", "-q"], plugins=[recorder]) == 0  # the probe learns alone
    return outcome(recorder.reports[0])


@pytest.mark.parametrize("name", list(CONTAMINATORS))
def test_a_specs_result_is_the_same_alone_and_after_another(name, sft, write_spec, tmp_path, alone):
    (tmp_path / "other.jinja").write_text(CHATML_LIKE, encoding="utf-8")
    write_spec("a_first.sft.yaml", CONTAMINATORS[name])
    write_spec("b_probe.sft.yaml", PROBE)
    result = sft("run", tmp_path, "--no-cache", "-v")
    first, probe = result.recorder.reports
    assert first.outcome in ("passed", "failed") and first.error is None, result.out  # it ran, whatever it learnt
    assert outcome(probe) == alone, result.out


def test_activation_checkpointing_is_switched_off_again_in_the_shared_base(sft, write_spec, tmp_path):
    from sft_spec_plugins.model.models import MODEL_CACHE

    write_spec("a_first.sft.yaml", CONTAMINATORS["activation_checkpointing"])
    write_spec("b_probe.sft.yaml", PROBE)
    result = sft("run", tmp_path, "--no-cache")
    assert not any("changed the shared base model" in n for r in result.recorder.reports for n in r.notes)
    cache = result.recorder.session.config.stash[MODEL_CACHE]
    assert cache.loads == 1 and not cache.loaded.model.is_gradient_checkpointing


class ReportsAsMade:
    """The notes of each report as sft_spec_make_report returns it: nothing may add to a report later."""

    def __init__(self):
        self.notes = {}

    @hookimpl(wrapper=True)
    def sft_spec_make_report(self, item, run, report):
        made = yield
        self.notes[item.name] = list(made.notes)
        return made


def test_a_change_to_the_shared_model_is_found_and_said(sft, write_spec, tmp_path):
    from sft_spec_plugins.model.models import MODEL_CACHE

    write_spec("a_first.sft.yaml", CONTAMINATORS["modules_to_save"])
    write_spec("b_probe.sft.yaml", PROBE)
    made = ReportsAsMade()
    result = sft("run", tmp_path, "--no-cache", plugins=[made])
    first = result.recorder.reports[0]
    assert any("this spec changed the shared base model (weights)" in n for n in first.notes), first.notes
    # Said in the report as it was made (it was appended after, by a wrapper around the whole run).
    assert made.notes["a_first"] == first.notes
    assert result.recorder.session.config.stash[MODEL_CACHE].loads == 2  # the probe got a fresh load
