"""When it was learnt: ``checks: {learns_within: 20}`` and ``--stop-when-learnt``.

While the model trains, its expectations are checked, and the first checked step at which every one
passes is recorded (``learnt_at_step`` in every report; ``learnt_checked_every`` says how fine the steps
were). An expectation that greedy decoding decides by its tokens (``equals``, with ``stops``) is probed by
teacher forcing: one batched forward pass says whether greedy decoding would give exactly the reference
and stop, so such specs are probed at every step and the step found is exact. Other checks generate
(through ``sft_spec_generate(when="during")``) every few steps and at each step a ``learns_within``
names, and only once the teacher-forced ones pass. A probe draws nothing from the training's random
number generators: adding the check changes no loss.
A recipe change that makes the model need 25 steps instead of 12 is a regression a loss curve hides.
``--stop-when-learnt`` ends training at that step (CI time saved); the final checks then run on the
model as trained, like any other run. A probe that passed on the weights training ended with (that step,
or the last) already knows the answers: the ones teacher forcing decided (the reference, then the end of
turn; not under bf16/fp16 mixed precision) and, when sft-spec's own generator answers without sampling,
the ones it generated. They are the answers after training; only the other prompts are generated again
(a note says so). The teacher-forced forward pass is the one generation runs (a peft model's base model,
adapters injected), not the trainer's forward, which accelerate wraps in autocast under mixed precision.
Expectations marked ``xfail`` (forgetting probes) and checks on the base model's answer (``before:``) are
not part of "learnt".
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sft_spec import hookimpl
from sft_spec.errors import SpecError
from sft_spec.registry import Check, CheckContext, CheckResult
from sft_spec.state import StashKey

#: At most this many mid-training checks per run: long runs are checked every few steps.
MAX_PROBES = 100
#: The answers a passing probe decided on the weights training ended with (see sft_spec_generate below).
FINAL_ANSWERS = StashKey["ProbedAnswers"]()


@hookimpl
def sft_spec_addoption(parser) -> None:
    parser.add_argument("--stop-when-learnt", action="store_true",
                        help="end training at the first step where every expectation passes (each step for "
                        "equals checks, by teacher forcing; every few steps for others); the step is in every report")


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


#: Checks a teacher-forced pass decides for greedy decoding: the answer is exactly the reference, and stops.
TEACHER_FORCED_CHECKS = frozenset({"equals", "stops"})


#: generation_config settings that change which token greedy decoding takes (logits processors): a
#: teacher-forced argmax does not see them.
PROCESSOR_SETTINGS = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
                      "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
                      "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "min_new_tokens": (None, 0),
                      "min_length": (None, 0), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
                      "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
                      "renormalize_logits": (None, False), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0),
                      "guidance_scale": (None, 1.0), "dola_layers": (None,)}


def _processed(model) -> bool:
    config = getattr(model, "generation_config", None)
    return config is not None and any(getattr(config, name, None) not in allowed
                                      for name, allowed in PROCESSOR_SETTINGS.items())


def builtin_generators_only(run) -> bool:
    """No plugin's own sft_spec_generate: what answers is sft-spec's generation (this plugin's answers
    after training are the ones it generated, or would have)."""
    owners = {impl.plugin_name for impl in run.config.pluginmanager.hook.sft_spec_generate.get_hookimpls()}
    return owners <= {"generation", "retains", "learning"}


def teacher_forced_targets(item, run, cases) -> list[list[int] | None]:
    """Per case, the tokens greedy decoding must produce for its checks to pass (the reference's, then the
    end of turn), or None where only generating can tell: a check besides equals and stops, a reference
    whose tokens do not decode back to it, one longer than its answer budget, sampling or beams, or a
    plugin's own generator (it answers the probes: #25's sft_spec_generate(when="during"))."""
    from .generation import GENERATION

    settings = item.section(GENERATION)
    if settings.do_sample or settings.num_beams != 1 or settings.repetition_penalty not in (None, 1.0) \
            or _processed(run.model) or not builtin_generators_only(run):
        return [None] * len(cases)
    tokenizer, out = run.loaded.tokenizer, []
    for exp, prompt in cases:
        names = [name for name, _ in exp.checks]
        reference = dict(exp.checks).get("equals")
        if "equals" not in names or not set(names) <= TEACHER_FORCED_CHECKS or not isinstance(reference, str) \
                or not reference or reference != reference.strip():
            out.append(None)
            continue
        ids = tokenizer(reference, add_special_tokens=False)["input_ids"]
        budget = prompt.max_new_tokens or settings.max_new_tokens
        out.append(ids if tokenizer.decode(ids, skip_special_tokens=True) == reference and len(ids) < budget
                   else None)
    return out


def teacher_forced_pass(model, tokenizer, prompts: list[str], targets: list[list[int]], stop_ids: list[int],
                        device, batch_size: int = 16, predicted: list[list[int]] | None = None
                        ) -> list[bool | None]:
    """Per prompt, what greedy decoding's answer would make of ``equals`` its target (and ``stops``), from
    one batched forward pass with the target as input, no generation: True when every target token is the
    argmax at its place and a stop token follows; False when greedy leaves the target for a token that
    shows in the answer and cannot spell the rest of it (the answer differs, whatever comes next); None
    when only generating can tell: a token the cleaned answer does not show (a special token, a space)
    where greedy may take a detour and still give the reference, or a character split between tokens.
    ``predicted``, when given, receives each prompt's greedy tokens along its target and one after."""
    rows = [(tokenizer(p, add_special_tokens=False)["input_ids"], t) for p, t in zip(prompts, targets, strict=True)]
    tokens: list[list[int]] = predicted if predicted is not None else []
    for start in range(0, len(rows), batch_size):  # as generation batches: bounded memory
        tokens += _forced_batch(model, tokenizer, rows[start:start + batch_size], device)
    return [_verdict(tokenizer, target, row, stop_ids) for (_, target), row in zip(rows, tokens, strict=True)]


def _forced_batch(model, tokenizer, rows, device) -> list[list[int]]:
    import torch

    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (prompt, target) in enumerate(rows):  # right-padded: a causal model's positions before are untouched
        seq = prompt + target
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    # Through the forward generation runs: a peft model generates with its base model's (adapters injected),
    # while the trainer wraps the peft model's own forward in autocast under bf16/fp16 (accelerate), which
    # generation never sees.
    forward = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = forward(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    finally:
        if was_training:
            model.train()
    return [logits[i, len(prompt) - 1:len(prompt) + len(target)].argmax(-1).tolist()
            for i, (prompt, target) in enumerate(rows)]


def _verdict(tokenizer, target: list[int], predicted: list[int], stop_ids: list[int]) -> bool | None:
    """``predicted[k]``: greedy's token after ``target[:k]``; the answer is cleaned as generation cleans it
    (special tokens skipped, spaces stripped at the ends)."""
    for k, token in enumerate(predicted):
        if k < len(target) and token == target[k]:
            continue
        if k == len(target) and token in stop_ids:
            return True  # exactly the reference, then the end of turn
        if token in stop_ids:
            return False  # stopped inside the reference: the answer is a part of it
        shown = tokenizer.decode([token], skip_special_tokens=True)
        if k == 0:  # the answer is stripped: a space its first token starts with does not show
            shown = shown.lstrip()
        rest = tokenizer.decode(target[k:], skip_special_tokens=True)
        if not shown.strip() or "\ufffd" in shown + rest:
            return None  # not shown in the answer, or half a character: greedy may still give the reference
        return None if rest.startswith(shown) else False  # another way to spell the rest, or a different answer
    return None


class LearntProbe:
    """A ``TrainerCallback`` that checks the expectations every ``every`` steps, and at the steps in ``at``,
    until they all pass. An expectation greedy decoding decides by its tokens (equals, stops) is probed by
    teacher forcing; the others generate, and only once those pass."""

    def __init__(self, item, run, stop: bool, every: int, at: frozenset[int] = frozenset()):
        self.item, self.run, self.stop, self.every, self.at = item, run, stop, every, at
        self.cases = [(exp, prompt) for exp, prompt in zip(item.selected_expectations, run.prompts, strict=True)
                      if exp.checks and not exp.xfail]
        self.targets = teacher_forced_targets(item, run, self.cases) if self.cases else []
        self.probes = 0
        self.forced = self.generated = 0
        self.undecided: list = []
        self.forced_answers: list = []  # the last teacher-forced probe's passes: (prompt, tokens, stop ids)
        self.generated_answers: list = []  # the last probe's generated answers: (prompt, answer)
        # Greedy (or beam) generation by sft-spec's own generator answers a prompt alike during and after
        # training on the same weights: a passing probe's generated answers are the final ones then.
        from .generation import GENERATION

        self.deterministic = not item.section(GENERATION).do_sample and builtin_generators_only(run)

    @property
    def all_forced(self) -> bool:
        return bool(self.targets) and all(t is not None for t in self.targets)

    def forced_pass(self, model) -> bool:
        """False when teacher forcing shows an expectation fails; the ones it cannot decide are left in
        ``undecided`` for generation."""
        from .generation import GENERATION, stop_token_ids

        run = self.run
        cases = [(c, t) for c, t in zip(self.cases, self.targets, strict=True) if t is not None]
        self.undecided = []
        if not cases:
            return True
        stop_ids = stop_token_ids(run.loaded.tokenizer, model, run.markers.end_of_turn if run.markers else None)
        self.forced += 1
        predicted: list[list[int]] = []
        verdicts = teacher_forced_pass(model, run.loaded.tokenizer, [p.text for (_, p), _ in cases],
                                       [t for _, t in cases], stop_ids, getattr(model, "device", run.loaded.device),
                                       batch_size=self.item.section(GENERATION).batch_size, predicted=predicted)
        self.undecided = [case for (case, _), verdict in zip(cases, verdicts, strict=True) if verdict is None]
        # What generating would answer where teacher forcing said "the reference, then the end of turn".
        self.forced_answers = [(prompt, target + row[len(target):len(target) + 1], stop_ids)
                               for ((_, prompt), target), row, verdict in zip(cases, predicted, verdicts, strict=True)
                               if verdict]
        return False not in verdicts

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
            self.probes += 1
            self.generated_answers = []
            if not self.forced_pass(model):  # the cheap probe first: no generation while it fails
                return False
            cases = [c for c, t in zip(self.cases, self.targets, strict=True) if t is None] + self.undecided
            if not cases:
                return True
            # Through the hook, as every other generation: a plugin's sft_spec_generate answers the probes too.
            trained, run.model = run.model, model
            try:
                answers = run.config.hook.sft_spec_generate(item=self.item, run=run,
                                                            prompts=[p for _, p in cases], when="during")
            finally:
                run.model = trained
            self.generated += 1
            if self.deterministic:
                self.generated_answers = [(prompt, answer) for (_, prompt), answer in zip(cases, answers, strict=True)]
            for (exp, prompt), answer in zip(cases, answers, strict=True):
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
        passed = self.all_pass(model if model is not None else self.run.model)
        self.run.metrics.update(learnt_probes_teacher_forced=self.forced, learnt_probes_generated=self.generated)
        if passed:
            self.run.metrics["learnt_at_step"] = step
            self.run.note(f"learnt at step {step} of {state.max_steps}: every expectation passed")
            if self.stop and step < state.max_steps:
                control.should_training_stop = True
                self.run.note(f"training stopped at step {step} of {state.max_steps} (--stop-when-learnt); the "
                              "checks ran on the model as trained")
            if control.should_training_stop or step >= state.max_steps:  # these are the weights training ends with
                # One full forward pass (teacher forcing) and step-by-step cached decoding can part on a near
                # tie in reduced precision: under bf16/fp16 only answers the probe generated are kept.
                mixed = bool(getattr(args, "bf16", False) or getattr(args, "fp16", False))
                self.keep_final_answers(model if model is not None else self.run.model, step, forced=not mixed)
        return control

    def keep_final_answers(self, model, step: int, forced: bool = True) -> None:
        from .generation import GENERATION, answer_from_tokens

        kept_forced = self.forced_answers if forced else []
        if not kept_forced and not self.generated_answers:
            return
        default = self.item.section(GENERATION).max_new_tokens
        tokenizer = self.run.loaded.tokenizer
        answers = {(prompt.text, prompt.max_new_tokens): answer_from_tokens(tokens, tokenizer, stop_ids,
                                                                             prompt.max_new_tokens or default)
                   for prompt, tokens, stop_ids in kept_forced}
        answers.update({(prompt.text, prompt.max_new_tokens): answer for prompt, answer in self.generated_answers})
        self.run.stash[FINAL_ANSWERS] = ProbedAnswers(model, weights_state(model), step, answers)


@dataclasses.dataclass
class ProbedAnswers:
    """Answers a probe decided on ``model`` at ``step``, valid while it computes as it did: the same
    parameter tensors (``.to()``, ``.half()`` or ``p.data = ...`` swap them), no in-place write through a
    parameter since (each bumps its version: every optimizer step does), and the same adapters merged and
    active. A write through ``p.data`` in place is not seen: nothing in sft-spec does that after training."""

    model: Any
    state: list | None  # weights_state(model) when the probe passed
    step: int
    answers: dict  # (prompt text, its max_new_tokens) -> Answer

    def hold_for(self, model) -> bool:
        return model is self.model and self.state is not None and weights_state(model) == self.state


def weights_state(model) -> list | None:
    try:
        tensors = [(name, p.data_ptr(), p.dtype, p.device, p._version) for name, p in model.named_parameters()]
    except (RuntimeError, TypeError, AttributeError):  # a tensor subclass without storage (a sharded DTensor)
        return None
    merged = [(name, tuple(getattr(m, "merged_adapters", ()))) for name, m in model.named_modules()
              if hasattr(m, "merged_adapters")]
    return [*tensors, *merged, ("active", repr(getattr(model, "active_adapters", None)))]


@hookimpl(tryfirst=True)
def sft_spec_generate(item, run, prompts, when):
    """After training, the answers a passing probe decided on the same weights; the other prompts are
    generated (a round trip's reloaded model, or weights changed since, are never answered from here)."""
    probed = run.stash.get(FINAL_ANSWERS, None)
    if when != "after" or probed is None or not probed.hold_for(run.model):
        return None
    keys = [(p.text, p.max_new_tokens) for p in prompts]
    missing = [p for p, key in zip(prompts, keys, strict=True) if key not in probed.answers]
    if len(missing) == len(prompts):
        return None
    generated = iter(run.config.hook.sft_spec_generate(item=item, run=run, prompts=missing, when=when)
                     if missing else [])
    reused = len(prompts) - len(missing)
    run.metrics["answers_from_probe"] = run.metrics.get("answers_from_probe", 0) + reused
    run.note(f"answers after training taken from the learnt probe at step {probed.step} (the same weights, "
             "no sampling), not generated again: metrics answers_from_probe counts them")
    return [dataclasses.replace(probed.answers[key]) if key in probed.answers else next(generated) for key in keys]


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
    probe = LearntProbe(item, run, bool(run.config.getoption("stop_when_learnt", False)), every=1, at=within)
    # A teacher-forced probe is a forward pass: up to ten times as many, so the step found is exact on most runs.
    probe.every = max(1, -(-steps // (10 * MAX_PROBES if probe.all_forced else MAX_PROBES)))
    trainer.add_callback(type("LearntCallback", (TrainerCallback,), {"on_step_end": probe.on_step_end})())
    run.metrics["learnt_checked_every"] = probe.every
    return trainer


@hookimpl
def sft_spec_cache_key(item, config):
    return {"stop_when_learnt": bool(config.getoption("stop_when_learnt", False))}
