"""Repeats across seeds decide on the share that passed; ``learns_within`` and ``--stop-when-learnt``
record the step at which every expectation first passed."""

from __future__ import annotations

import pytest

from sft_spec import hookimpl
from sft_spec.registry import Check, CheckResult


class OddSeeds:
    """A check that holds on odd training seeds only: a stand-in for a flaky recipe, deterministic."""

    @hookimpl
    def sft_spec_register_checks(self, register):
        def odd_seed(answer, argument, ctx):
            seed = ctx.item.spec.training.get("seed")
            return CheckResult(seed % 2 == 1, f"seed {seed}")

        register(Check("odd_seed", odd_seed, "holds on odd seeds"))


REPEATED = """\
model: builtin:tiny-gemma
method: lora  # LoRA's A matrices start random: each seed trains a different model
training: {{num_train_epochs: 2, learning_rate: 1.0e-3}}
repeat: {{seeds: [1, 2, 3], pass_rate: {rate}}}
data:
  conversations:
    - - {{role: user, content: 微调测试}}
      - {{role: assistant, content: 我学会了}}
expect:
  - prompt: 微调测试
    odd_seed: true
"""


def test_a_case_passes_on_the_share_of_seeds_it_asks_for(sft, write_spec):
    result = sft("run", write_spec("r.sft.yaml", REPEATED.format(rate=0.6)), "--no-cache", plugins=[OddSeeds()])
    report = result.recorder.reports[0]
    case = report.expectations[0]
    assert report.outcome == "passed" and case.outcome == "passed", result.out
    assert case.checks[-1].name == "repeat"
    assert case.checks[-1].message == "passed on 2 of 3 seeds (1, 3); needs 2 (pass_rate 0.6)"
    seeds = report.extra["seeds"]
    assert [s["seed"] for s in seeds] == [1, 2, 3] and [s["outcome"] for s in seeds] == ["passed", "failed", "passed"]
    assert all(len(s["losses"]) == 2 for s in seeds)
    assert len({tuple(s["losses"]) for s in seeds}) == 3  # each seed really trained on its own
    # What is shown is what to look at: the check on a seed where it failed.
    assert case.checks[0].message.startswith("seed 2")


def test_a_stricter_share_fails_the_same_recipe(sft, write_spec):
    result = sft("run", write_spec("r.sft.yaml", REPEATED.format(rate=1.0)), "--no-cache", plugins=[OddSeeds()])
    case = result.recorder.reports[0].expectations[0]
    assert result.code == 1 and case.outcome == "failed"
    assert case.checks[-1].message == "passed on 2 of 3 seeds (1, 3); needs 3 (pass_rate 1)"


def test_repeat_replaces_the_specs_own_seed_with_a_note(sft, write_spec):
    text = REPEATED.format(rate=0.6).replace("learning_rate: 1.0e-3", "learning_rate: 1.0e-3, seed: 7")
    result = sft("run", write_spec("r.sft.yaml", text), "--no-cache", plugins=[OddSeeds()])
    assert any("repeat sets training.seed to each of 1, 2, 3; the spec's seed 7 is not used" in n
               for n in result.recorder.reports[0].notes)


LEARN = """\
model: builtin:tiny-gemma
method: full
training: {{num_train_epochs: 30, learning_rate: {lr}, per_device_train_batch_size: 8}}
data:
  conversations:
    - - {{role: user, content: 微调测试}}
      - {{role: assistant, content: 我学会了}}
expect:
  - prompt: 微调测试
    equals: 我学会了
    before: {{not_equals: 我学会了}}
checks: {{learns_within: {within}}}
"""


def test_the_step_at_which_it_was_learnt_is_recorded_and_checked(sft, write_spec):
    result = sft("run", write_spec("l.sft.yaml", LEARN.format(lr="3.0e-3", within=30)), "--no-cache")
    report = result.recorder.reports[0]
    learnt = report.metrics["learnt_at_step"]
    assert result.code == 0 and 1 <= learnt <= 30 and report.metrics["steps"] == 30, result.out
    check = report.training_checks[0].checks[0]
    assert check.message == f"learnt at step {learnt} (needs 30 or fewer)" and check.score == learnt


def test_stop_when_learnt_ends_training_there_and_the_final_checks_still_run(sft, write_spec):
    result = sft("run", write_spec("l.sft.yaml", LEARN.format(lr="3.0e-3", within=30)), "--no-cache",
                 "--stop-when-learnt")
    report = result.recorder.reports[0]
    learnt = report.metrics["learnt_at_step"]
    assert report.metrics["steps"] == learnt < 30 and len(report.losses) == learnt, report.metrics
    assert report.expectations[0].outcome == "passed" and report.expectations[0].answer == "我学会了"
    assert any(f"training stopped at step {learnt} of 30 (--stop-when-learnt)" in n for n in report.notes)


class AfterTraining:
    """Counts the prompts generated between the end of training and sft_spec_after_training (the final
    generation), and generates every answer again there on the weights as trained, to compare. Not a
    generator itself (a plugin's generator turns teacher forcing off): it wraps generation's function."""

    def __init__(self, monkeypatch, touch_weights: str = ""):
        from sft_spec_plugins.check import generation

        self.generate, self.touch_weights = generation.generate_answers, touch_weights
        self.trained = False
        self.generated_after, self.regenerated = [], []

        def counted(model, tokenizer, texts, **kwargs):
            if self.trained:
                self.generated_after += texts
            return self.generate(model, tokenizer, texts, **kwargs)

        monkeypatch.setattr(generation, "generate_answers", counted)

    @hookimpl(wrapper=True)
    def sft_spec_train(self, item, run, trainer):
        losses = yield
        self.trained = True
        if self.touch_weights:  # the same values: but the probed weights may no longer be these
            import torch

            parameter = next(run.model.parameters())
            with torch.no_grad():
                if self.touch_weights == "in place":
                    parameter.mul_(1.0)
                else:  # a tensor swapped in (as .to() does): no version bump
                    parameter.data = parameter.data.clone()
        return losses

    @hookimpl
    def sft_spec_after_training(self, item, run):
        from sft_spec_plugins.check.generation import GENERATION, stop_token_ids

        self.trained = False
        stops = stop_token_ids(run.loaded.tokenizer, run.model, run.markers.end_of_turn)
        self.regenerated = self.generate(run.model, run.loaded.tokenizer, [p.text for p in run.prompts],
                                         stop_ids=stops, settings=item.section(GENERATION), device=run.model.device,
                                         budgets=[p.max_new_tokens for p in run.prompts])


def test_the_answer_a_passing_probe_decided_on_the_final_weights_is_not_generated_again(sft, write_spec,
                                                                                       monkeypatch):
    # --stop-when-learnt ends training at the step whose probe passed: those are the final weights, and
    # teacher forcing already knows the answer (the reference, then the end of turn).
    after = AfterTraining(monkeypatch)
    text = LEARN.format(lr="3.0e-3", within=30)
    report = sft("run", write_spec("l.sft.yaml", text), "--no-cache", "--stop-when-learnt",
                 plugins=[after]).recorder.reports[0]
    assert after.generated_after == [] and report.metrics["answers_from_probe"] == 1, report.metrics
    assert report.expectations[0].outcome == "passed"
    step = report.metrics["learnt_at_step"]
    assert any(f"taken from the learnt probe at step {step} (the same weights" in n for n in report.notes), report.notes
    kept = report.expectations[0]
    (generated,) = after.regenerated  # what generating on the same weights gives, field by field
    assert (kept.answer, kept.raw_answer, kept.stopped) == (generated.text, generated.raw, generated.stopped)


def test_an_answer_the_last_probe_generated_is_not_generated_again(sft, write_spec, monkeypatch):
    # gemma-3-270m's canary: teacher forcing cannot decide (a token the answer does not show), the probe
    # generates, and at the step training stops that generation is the final one.
    after = AfterTraining(monkeypatch)
    text = LEARN.format(lr="3.0e-3", within=30).replace("    equals: 我学会了\n", "    contains: 学会\n")
    report = sft("run", write_spec("c.sft.yaml", text), "--no-cache", "--stop-when-learnt",
                 plugins=[after]).recorder.reports[0]
    assert report.metrics["learnt_probes_teacher_forced"] == 0 < report.metrics["learnt_probes_generated"]
    assert after.generated_after == [] and report.metrics["answers_from_probe"] == 1, report.metrics
    kept, (generated,) = report.expectations[0], after.regenerated
    assert (kept.answer, kept.raw_answer, kept.stopped) == (generated.text, generated.raw, generated.stopped)


def test_sampled_answers_after_training_are_generated_again(sft, write_spec, monkeypatch):
    after = AfterTraining(monkeypatch)
    text = LEARN.format(lr="3.0e-3", within=30).replace("    equals: 我学会了\n", "    contains: 学会\n") + \
        "generation: {do_sample: true, temperature: 0.01}\n"
    report = sft("run", write_spec("s.sft.yaml", text), "--no-cache", "--stop-when-learnt",
                 plugins=[after]).recorder.reports[0]
    assert len(after.generated_after) == 1 and "answers_from_probe" not in report.metrics, report.metrics


def test_under_mixed_precision_a_teacher_forced_answer_is_generated_again(sft, write_spec, monkeypatch):
    # The trainer's forward (the teacher-forced probe's) runs in bf16 autocast, generation does not: near
    # ties could differ, so only answers the probe generated (as generation does) are kept.
    from sft_spec_plugins.check import learning

    last = {}
    original = learning.LearntProbe.keep_final_answers

    def keep(self, model, step, forced=True):
        last.update(forced=forced, forced_answers=len(self.forced_answers), generated=len(self.generated_answers))
        return original(self, model, step, forced)

    monkeypatch.setattr(learning.LearntProbe, "keep_final_answers", keep)
    after = AfterTraining(monkeypatch)
    text = LEARN.format(lr="3.0e-3", within=30).replace("batch_size: 8", "batch_size: 8, bf16: true")
    report = sft("run", write_spec("b.sft.yaml", text), "--no-cache", "--stop-when-learnt",
                 plugins=[after]).recorder.reports[0]
    if not any("bf16 autocast" in n for n in report.notes):
        pytest.skip("this CPU runs bf16 without autocast (no native bf16): " + "; ".join(report.notes))
    assert last["forced"] is False and report.expectations[0].outcome == "passed", last
    # The answer came from the probe only if the probe generated it; else it was generated after training.
    assert len(after.generated_after) == (0 if last["generated"] else 1), (last, after.generated_after)
    assert report.metrics.get("answers_from_probe", 0) == last["generated"], report.metrics


def test_a_lora_probe_runs_the_forward_generation_runs(sft, write_spec, monkeypatch):
    # Under bf16 the trainer wraps the peft model's forward in autocast; generation goes through the base
    # model's forward (adapters injected) and never sees it. The probe called the wrapped one: its logits
    # and generation's could part on a near tie, and --stop-when-learnt stop where the answer still failed.
    import torch
    from peft import PeftModelForCausalLM as PeftModel

    no_grad_calls = []
    original = PeftModel.forward

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            no_grad_calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "forward", forward)
    text = LEARN.format(lr="1.0e-2", within=30).replace("method: full", "method: lora\nlora: {r: 8, lora_alpha: 16, "
                                                        "target_modules: [q_proj, v_proj]}")
    report = sft("run", write_spec("l.sft.yaml", text), "--no-cache").recorder.reports[0]
    assert report.metrics["learnt_probes_teacher_forced"] > 0, report.metrics
    assert no_grad_calls == [], len(no_grad_calls)


@pytest.mark.parametrize("touch", ["in place", "swapped"])
def test_weights_written_after_the_probe_are_answered_by_generating(sft, write_spec, monkeypatch, touch):
    after = AfterTraining(monkeypatch, touch_weights=touch)
    report = sft("run", write_spec("l.sft.yaml", LEARN.format(lr="3.0e-3", within=30)), "--no-cache",
                 "--stop-when-learnt", plugins=[after]).recorder.reports[0]
    assert len(after.generated_after) == 1, after.generated_after
    assert "answers_from_probe" not in report.metrics and report.expectations[0].outcome == "passed"


def test_a_recipe_that_does_not_learn_in_time_fails_learns_within(sft, write_spec):
    text = LEARN.format(lr="1.0e-9", within=5).replace("num_train_epochs: 30", "num_train_epochs: 3")
    result = sft("run", write_spec("l.sft.yaml", text), "--no-cache")
    check = result.recorder.reports[0].training_checks[0]
    assert check.outcome == "failed" and check.checks[0].message.startswith("not learnt in 3 steps")


def test_learns_within_needs_expectations(sft, write_spec):
    text = LEARN.format(lr="3.0e-3", within=5).split("expect:")[0] + "checks: {learns_within: 5}\n"
    result = sft("validate", write_spec("l.sft.yaml", text))
    assert result.code == 1 and "learns_within needs expectations" in result.out and "l.sft.yaml:8:" in result.out


FROM_THE_START = """\
model: builtin:tiny-gemma
method: full
training: {num_train_epochs: 250, learning_rate: 1.0e-9, per_device_train_batch_size: 8}
data:
  conversations:
    - - {role: user, content: 微调测试}
      - {role: assistant, content: 我学会了}
expect:
  - prompt: 微调测试
    not_equals: an answer no model gives
checks: {learns_within: 1}
"""


def test_learns_within_is_checked_at_its_own_step_whatever_the_probe_spacing(sft, write_spec):
    # 250 steps are probed every 3; a check that holds from the first step once failed as "learnt at step 3".
    result = sft("run", write_spec("l.sft.yaml", FROM_THE_START), "--no-cache", "--stop-when-learnt")
    report = result.recorder.reports[0]
    assert report.metrics["learnt_checked_every"] == 3 and report.metrics["learnt_at_step"] == 1, report.metrics
    check = report.training_checks[0]
    assert check.outcome == "passed", check
    assert check.checks[0].message == "learnt at step 1 (needs 1 or fewer; checked every 3 steps and at step 1)"


SAMPLED = """\
model: builtin:tiny-gemma
method: lora
lora: {{r: 8, lora_alpha: 16, lora_dropout: 0.1, target_modules: [q_proj, v_proj]}}
training: {{num_train_epochs: 4, learning_rate: 1.0e-3, per_device_train_batch_size: 2}}
generation: {{do_sample: true}}
data:
  conversations:
    - - {{role: user, content: 微调测试}}
      - {{role: assistant, content: 我学会了}}
    - - {{role: user, content: apple}}
      - {{role: assistant, content: 苹果}}
    - - {{role: user, content: grape}}
      - {{role: assistant, content: 葡萄}}
    - - {{role: user, content: melon}}
      - {{role: assistant, content: 西瓜}}
expect:
  - prompt: 微调测试
    equals: 我学会了
{checks}"""


def test_a_sampled_probe_does_not_change_training(sft, write_spec):
    # The probe sampled from the training's RNG: the next steps' dropout masks, and so their losses, moved.
    plain = sft("run", write_spec("a.sft.yaml", SAMPLED.format(checks="")), "--no-cache").recorder.reports[0]
    probed = sft("run", write_spec("b.sft.yaml", SAMPLED.format(checks="checks: {learns_within: 8}\n")),
                 "--no-cache").recorder.reports[0]
    assert probed.metrics["learnt_checked_every"] == 1 and len(plain.losses) == 8
    assert probed.losses == plain.losses


class CannedFromStepThree:
    """A user's generator: answers "我学会了" from its third probe on (30 steps are probed at every step),
    and records each call."""

    def __init__(self):
        self.calls = []

    @hookimpl(tryfirst=True)
    def sft_spec_generate(self, item, run, prompts, when):
        from sft_spec.state import Answer

        step = sum(w == "during" for w, _ in self.calls) + 1 if when == "during" else None
        self.calls.append((when, step))
        if when == "before":
            return None
        text = "我学会了" if when == "after" or step >= 3 else "?"
        return [Answer(text=text, raw=text, stopped=True) for _ in prompts]


def test_a_plugins_generator_answers_the_learns_within_probes(sft, write_spec):
    # The probes generated through the built-in generator directly, so a user's sft_spec_generate (a
    # serving stack, a canned answer) was never asked while the model trained.
    canned = CannedFromStepThree()
    spec = write_spec("l.sft.yaml", LEARN.format(lr="1.0e-9", within=30))  # the weights barely move
    result = sft("run", spec, "--no-cache", plugins=[canned])
    report = result.recorder.reports[0]
    during = [step for when, step in canned.calls if when == "during"]
    assert during and report.metrics["learnt_at_step"] == 3, (canned.calls, report.metrics)
    assert result.code == 0, result.out


class BothWays:
    """At every training step, the learnt probe's verdict (teacher forcing, generating what it cannot
    decide) and the one of generating every answer and checking it, side by side."""

    def __init__(self):
        self.steps = []

    @hookimpl(wrapper=True)
    def sft_spec_make_trainer(self, item, run, examples):
        from transformers import TrainerCallback

        from sft_spec_plugins.check.generation import stop_token_ids
        from sft_spec_plugins.check.learning import LearntProbe, teacher_forced_pass

        trainer = yield
        probe = LearntProbe(item, run, stop=False, every=1)
        assert probe.all_forced, probe.targets
        cases, steps = probe.cases, self.steps

        def on_step_end(callback, args, state, control, model=None, **kwargs):
            tokenizer = run.loaded.tokenizer
            stops = stop_token_ids(tokenizer, model, run.markers.end_of_turn)
            forced = teacher_forced_pass(model, tokenizer, [p.text for _, p in cases], probe.targets, stops,
                                         model.device)
            answers = run.config.hook.sft_spec_generate(item=item, run=run, prompts=[p for _, p in cases],
                                                        when="during")
            generated = [a.text == dict(e.checks)["equals"] and a.stopped
                         for (e, _), a in zip(cases, answers, strict=True)]
            steps.append((state.global_step, forced, generated, probe.all_pass(model)))
            return control

        trainer.add_callback(type("BothWays", (TrainerCallback,), {"on_step_end": on_step_end})())
        return trainer


EQUIVALENCE = """\
model: builtin:tiny-gemma
method: full
training: {num_train_epochs: 40, learning_rate: 4.0e-4, per_device_train_batch_size: 8}
data:
  conversations:
    - - {role: user, content: 微调测试}
      - {role: assistant, content: 我学会了}
    - - {role: user, content: 你叫什么名字}
      - {role: assistant, content: 我叫小明}
    - - {role: user, content: ping}
      - {role: assistant, content: pong pong}
expect:
  - {prompt: 微调测试, equals: 我学会了}
  - {prompt: 你叫什么名字, equals: 我叫小明, stops: true}
  - {prompt: ping, equals: pong pong}
"""


def test_a_teacher_forced_probe_agrees_with_greedy_generation_at_every_step(sft, write_spec):
    # The cheap probe (one forward pass) must say what generating and checking would say, step by step, on
    # a real run: before the answers are learnt, while some are, and after. What teacher forcing decides
    # (True or False) is generation's verdict; what it cannot (None: a token the answer does not show)
    # the probe generates.
    both = BothWays()
    sft("run", write_spec("eq.sft.yaml", EQUIVALENCE), "--no-cache", plugins=[both])
    assert len(both.steps) == 40
    wrong = [(step, forced, generated) for step, forced, generated, _ in both.steps
             if any(f is not None and f != g for f, g in zip(forced, generated, strict=True))]
    assert wrong == [], wrong
    assert [probe for *_, probe in both.steps] == [all(generated) for _, _, generated, _ in both.steps]
    decided = {f for _, forced, _, _ in both.steps for f in forced}
    assert {True, False} <= decided, decided  # both verdicts reached without generating


def test_a_teacher_forced_probe_is_exact_and_leaves_training_as_it_was(sft, write_spec):
    # 300 steps: generated probes were spaced (every 3 steps, at most 100 of them), so the step found was
    # rounded up; a forward pass per step makes it exact, and draws nothing from the training's RNG.
    text = LEARN.format(lr="4.0e-4", within=300).replace("num_train_epochs: 30", "num_train_epochs: 300")
    probed = sft("run", write_spec("p.sft.yaml", text), "--no-cache").recorder.reports[0]
    plain = sft("run", write_spec("q.sft.yaml", text.replace("checks: {learns_within: 300}\n", "")),
                "--no-cache").recorder.reports[0]
    assert probed.metrics["learnt_checked_every"] == 1, probed.metrics
    # Generating only where teacher forcing cannot decide (a token the answer would not show).
    assert probed.metrics["learnt_probes_generated"] < probed.metrics["learnt_probes_teacher_forced"]
    assert probed.metrics["learnt_probes_teacher_forced"] == probed.metrics["learnt_at_step"]  # one per step
    assert probed.losses == plain.losses


def test_a_check_only_generation_can_decide_is_probed_by_generating(sft, write_spec):
    text = LEARN.format(lr="3.0e-3", within=30).replace("    equals: 我学会了\n", "    contains: 学会\n")
    report = sft("run", write_spec("c.sft.yaml", text), "--no-cache").recorder.reports[0]
    assert report.metrics["learnt_probes_teacher_forced"] == 0 < report.metrics["learnt_probes_generated"]


class Pieces:
    """A tokenizer of whole pieces: id -> text (special tokens decode to nothing)."""

    TEXT = {1: "Paris", 2: " Paris", 3: " Rome", 4: "<eot>", 5: "\n"}

    def decode(self, ids, skip_special_tokens=False):
        return "".join("" if skip_special_tokens and i == 4 else self.TEXT[i] for i in ids)


@pytest.mark.parametrize("predicted,verdict", [
    ([1, 4], True),      # the reference, then the end of turn
    ([2, 4], None),      # " Paris": the answer is stripped, so it may still be "Paris": generation decides
    ([3, 4], False),     # " Rome": another answer, whatever comes next
    ([1, 5], None),      # a newline after it: stripped away if the turn ends next
    ([4, 4], False),     # stopped before the reference
])
def test_a_teacher_forced_verdict_is_what_the_cleaned_answer_would_say(predicted, verdict):
    # A first token with a leading space (SmolLM2's and gemma's "▁Paris") made the probe say "not learnt"
    # while generation, which strips the answer, said learnt: --stop-when-learnt never stopped.
    from sft_spec_plugins.check.learning import _verdict

    assert _verdict(Pieces(), [1], predicted, [4]) is verdict


def test_a_logits_processor_leaves_the_probe_to_generation(sft, write_spec):
    # A repetition penalty changes which token greedy takes; an argmax does not see it ("learnt" at a step
    # where the final answer failed).
    text = LEARN.format(lr="3.0e-3", within=30) + "generation: {repetition_penalty: 1.3}\n"
    report = sft("run", write_spec("r.sft.yaml", text), "--no-cache").recorder.reports[0]
    assert report.metrics["learnt_probes_teacher_forced"] == 0 < report.metrics["learnt_probes_generated"]
