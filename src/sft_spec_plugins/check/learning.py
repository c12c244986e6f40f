"""When it was learnt: ``checks: {learns_within: 20}`` and ``--stop-when-learnt``.

While the model trains, its expectations are checked every few steps and at each step a ``learns_within``
names (one batched generation of their prompts), and the first checked step at which every one passes is
recorded (``learnt_at_step`` in every report; ``learnt_checked_every`` says how fine the steps were). A
probe draws nothing from the training's random number generators: adding the check changes no loss.
A recipe change that makes the model need 25 steps instead of 12 is a regression a loss curve hides.
``--stop-when-learnt`` ends training at that step (CI time saved); the final checks then run on the
model as trained, like any other run. Expectations marked ``xfail`` (forgetting probes) and checks on
the base model's answer (``before:``) are not part of "learnt".
"""

from __future__ import annotations

from typing import Any

from sft_spec import hookimpl
from sft_spec.errors import SpecError
from sft_spec.registry import Check, CheckContext, CheckResult

#: At most this many mid-training checks per run: long runs are checked every few steps.
MAX_PROBES = 100


@hookimpl
def sft_spec_addoption(parser) -> None:
    parser.add_argument("--stop-when-learnt", action="store_true",
                        help="end training at the first step where every expectation passes (checked every "
                        "few steps); the step is in every report")


def _valid(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"expected a number of steps (at least 1), got {value!r}"
    return None


def learns_within(_: str, steps: int, ctx: CheckContext) -> CheckResult:
    learnt = ctx.run.metrics.get("learnt_at_step") if ctx.run else None
    every = ctx.run.metrics.get("learnt_checked_every", 1) if ctx.run else 1
    # Step `steps` itself is always checked, so the verdict is exact; the step found is exact to `every`.
    granularity = f"; checked every {every} steps and at step {steps}" if every > 1 else ""
    if learnt is None:
        total = ctx.run.metrics.get("steps", "?") if ctx.run else "?"
        return CheckResult(False, f"not learnt in {total} steps (every expectation passing; needs {steps}"
                                  f"{granularity})")
    return CheckResult(learnt <= steps, f"learnt at step {learnt} (needs {steps} or fewer{granularity})",
                       score=float(learnt))


@hookimpl
def sft_spec_register_checks(register) -> None:
    register(Check("learns_within", learns_within, "steps: every expectation passes by this training step "
                   "(checked while training)", _valid, scope="training"))


def _wanted(item, config) -> bool:
    return any(c.name == "learns_within" for c in item.selected_training_checks) or bool(
        config.getoption("stop_when_learnt", False))


@hookimpl
def sft_spec_validate_spec(item, config) -> list[SpecError]:
    if "learns_within" in item.spec.checks and not any(
            exp.checks and not exp.xfail for exp in item.expectations):
        return [SpecError("learns_within needs expectations (expect: with checks on the answer) to know when "
                          "the model has learnt", item.locate("checks", "learns_within"), key="checks.learns_within")]
    return []


class LearntProbe:
    """A ``TrainerCallback`` that checks the expectations every ``every`` steps, and at the steps in ``at``,
    until they all pass."""

    def __init__(self, item, run, stop: bool, every: int, at: frozenset[int] = frozenset()):
        self.item, self.run, self.stop, self.every, self.at = item, run, stop, every, at
        self.cases = [(exp, prompt) for exp, prompt in zip(item.selected_expectations, run.prompts, strict=True)
                      if exp.checks and not exp.xfail]
        self.probes = 0

    def all_pass(self, model) -> bool:
        """Whether every expectation passes on ``model``, the one the trainer trains (generators read
        ``run.model``: it is that model while they answer, e.g. the trainer's wrapped one under FSDP)."""
        import torch

        run = self.run
        registry = run.config.registry.checks
        device = getattr(model, "device", run.loaded.device)
        # A sampled probe must not move the RNG that shuffles the next epoch: it draws from a forked state.
        cuda = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
        # Generation and the checks (a metric that loads a model draws from it too) use a forked state.
        with torch.random.fork_rng(devices=cuda):
            # Through the hook, as every other generation: a plugin's sft_spec_generate answers the probes too.
            trained, run.model = run.model, model
            try:
                answers = run.config.hook.sft_spec_generate(item=self.item, run=run,
                                                            prompts=[p for _, p in self.cases], when="during")
            finally:
                run.model = trained
            self.probes += 1
            for (exp, prompt), answer in zip(self.cases, answers, strict=True):
                base = run.base_answers.get(exp.index)
                ctx = CheckContext(item=self.item, run=run, case=exp, answer=answer, prompt=prompt,
                                   base_answer=base.text if base else None, losses=run.losses)
                if not all(registry[name].func(answer.text, argument, ctx).passed for name, argument in exp.checks):
                    return False
        return True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if "learnt_at_step" in self.run.metrics or not self.cases:
            return control
        if step % self.every and step != state.max_steps and step not in self.at:
            return control
        if self.all_pass(model if model is not None else self.run.model):
            self.run.metrics["learnt_at_step"] = step
            self.run.note(f"learnt at step {step} of {state.max_steps}: every expectation passed")
            if self.stop and step < state.max_steps:
                control.should_training_stop = True
                self.run.note(f"training stopped at step {step} of {state.max_steps} (--stop-when-learnt); the "
                              "checks ran on the model as trained")
        return control


@hookimpl(wrapper=True)
def sft_spec_make_trainer(item, run, examples):
    trainer = yield
    if trainer is None or not _wanted(item, run.config):
        return trainer
    from transformers import TrainerCallback

    steps = trainer.args.max_steps if trainer.args.max_steps > 0 else None
    if steps is None:
        per_epoch = -(-len(examples) // (trainer.args.per_device_train_batch_size
                                         * trainer.args.gradient_accumulation_steps))
        steps = max(1, int(per_epoch * trainer.args.num_train_epochs))
    within = frozenset(argument for name, argument in item.spec.checks.items() if name == "learns_within")
    probe = LearntProbe(item, run, bool(run.config.getoption("stop_when_learnt", False)),
                        every=max(1, -(-steps // MAX_PROBES)), at=within)
    trainer.add_callback(type("LearntCallback", (TrainerCallback,), {"on_step_end": probe.on_step_end})())
    run.metrics["learnt_checked_every"] = probe.every
    return trainer


@hookimpl
def sft_spec_cache_key(item, config):
    return {"stop_when_learnt": bool(config.getoption("stop_when_learnt", False))}
