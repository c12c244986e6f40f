"""The run protocol of one spec; each arrow is a hook, each phase fills its fields of the ``SpecRun``:

load (+ chat markers) -> format -> generate before -> mask -> train -> generate after -> after training
-> check -> make report. No phase reaches back into an earlier one: generation says ``when``, checks
are final when the check hook returns them. This built-in plugin implements ``sft_spec_run_spec``,
``sft_spec_check`` and ``sft_spec_make_report``; it imports no torch itself.
"""

from __future__ import annotations

import json
import re
import time
import traceback
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pluggy

from sft_spec import hookimpl
from sft_spec.errors import SkipSpec, SpecError, SpecTimeout
from sft_spec.registry import CheckContext
from sft_spec.reports import (
    XPASS_STRICT,
    CheckReport,
    ErrorInfo,
    ExpectationReport,
    MaskSummary,
    SpecReport,
    new_report,
)
from sft_spec.state import Answer, Case, Expectation, SpecItem, SpecRun

if TYPE_CHECKING:
    from sft_spec.config import Config
    from sft_spec.session import Session


class PhaseError(Exception):
    def __init__(self, phase: str, original: BaseException):
        super().__init__(str(original))
        self.phase = phase
        self.original = original


#: The spec key each phase's problems most likely come from, for error locations.
_PHASE_KEYS = {"load": ("model",), "format": ("format",), "mask": ("format", "collator"), "train": ("training",)}


@contextmanager
def _phase(report: SpecReport, item: SpecItem, name: str):
    start = time.perf_counter()
    try:
        yield
    except SpecError as exc:
        exc.phase = getattr(exc, "phase", None) or name
        if exc.location is None:
            exc.location = item.locate(*_PHASE_KEYS.get(name, ()))
        raise
    except (SkipSpec, KeyboardInterrupt, PhaseError):
        raise
    except (Exception, SpecTimeout) as exc:
        raise PhaseError(name, exc) from exc
    finally:
        report.phases[name] = report.phases.get(name, 0.0) + time.perf_counter() - start


@hookimpl(trylast=True)
def sft_spec_run_spec(item: SpecItem, session: Session) -> SpecReport:
    if item.spec.skip:
        return skipped_report(item, item.spec.skip)
    report = new_report(item)
    start = time.perf_counter()
    config = session.config
    run = SpecRun(item=item, config=config)
    try:
        _run_phases(item, run, report, config.hook)
    except SkipSpec as exc:
        report = skipped_report(item, str(exc))
    except SpecTimeout as exc:  # between phases
        report.outcome = "error"
        report.error = ErrorInfo(f"timed out: {exc}", location=str(item.location), kind="timeout")
    except KeyboardInterrupt:
        report.outcome = "interrupted"
        report.error = ErrorInfo("interrupted by the user (Ctrl-C)", kind="interrupted")
    except SpecError as exc:
        report.outcome = "error"
        report.error = ErrorInfo(exc.message, location=str(exc.location or item.location),
                                 phase=getattr(exc, "phase", None) or "validate")
    except PhaseError as exc:
        report.outcome = "error"
        report.error = _error_info(item, config, exc)
    finally:
        for fn in reversed(run.finalizers):
            try:
                fn()
            except (Exception, SpecTimeout) as exc:  # noqa: BLE001 - cleanup must not hide the spec's own result
                run.note(f"cleanup failed: {type(exc).__name__}: {exc}")
                if run.loaded is not None:
                    run.loaded.dirty = True  # a cleanup that did not finish leaves the shared model unknown
        report.duration = time.perf_counter() - start
        report.notes.extend(n for n in run.notes if n not in report.notes)
        report.settings = run.settings
        report.metrics.update(run.metrics)
        if item.spec.xfail:
            report.metrics["xfail_strict"] = item.spec.xfail.strict
    if report.outcome not in ("error", "skipped", "interrupted"):
        report = config.hook.sft_spec_make_report(item=item, run=run, report=report)
    return report


def _error_info(item: SpecItem, config: Config, exc: PhaseError) -> ErrorInfo:
    original = exc.original
    kind = "oom" if _is_oom(original) else "timeout" if isinstance(original, SpecTimeout) else "error"
    message = f"{type(original).__name__}: {original}"
    if kind == "oom":
        message = f"out of memory in phase {exc.phase}: {original}"
    elif kind == "timeout":
        message = f"timed out in phase {exc.phase}: {original}"
    elif isinstance(original, FloatingPointError):
        kind = "nan"
    return ErrorInfo(message=message, location=str(blamed_location(item, exc.phase, str(original))), phase=exc.phase,
                     plugin=plugin_name_for_traceback(config.pluginmanager, original.__traceback__), kind=kind,
                     traceback="".join(traceback.format_exception(original)))


#: Words of recipe keys too common in error messages to point at a key by themselves.
_GENERIC = {"lora", "adam", "num", "train", "per", "device", "size", "steps", "max", "min", "eval", "type", "kwargs"}


def blamed_location(item: SpecItem, phase: str, message: str):
    """Where a crash most likely comes from: a recipe key the message names (``dropout`` -> lora_dropout,
    ``beta`` -> adam_beta1), else the section the phase reads; the spec's first line only as a last resort."""
    text = message.lower()
    words = set(re.findall(r"[a-z0-9]+", text))
    for section in ("training", "lora", "quantization"):
        for key, value in getattr(item.spec, section).items():
            inner = [str(k).lower() for k in value] if isinstance(value, dict) else []  # lr_scheduler_kwargs.bogus
            named = [str(key).lower(), *inner]
            # A key's words, a numbered one without its number (adam_beta1: "beta" in "Invalid beta parameter").
            parts = {re.sub(r"\d+$", "", part) for part in str(key).lower().split("_")} - _GENERIC - {""}
            if any(re.search(rf"\b{re.escape(n)}\b", text) for n in named) or parts & words:
                return item.locate(section, key)
    keys = _PHASE_KEYS.get(phase)
    if phase == "train" and item.spec.method != "full" and "lora" in message.lower():
        keys = ("lora",)
    return item.locate(*keys) if keys and (keys[0] in (item.doc.data if item.doc else {})) else item.location


def skipped_report(item: SpecItem, reason: str) -> SpecReport:
    """A spec that did not run: every selected case skipped, training checks included."""
    report = new_report(item, "skipped")
    report.skip_reason = reason
    for exp in item.selected_expectations:
        report.expectations.append(ExpectationReport(nodeid=exp.nodeid, index=exp.index, prompt=exp.prompt,
                                                     outcome="skipped", location=str(exp.location)))
    for check in item.selected_training_checks:
        report.training_checks.append(ExpectationReport(nodeid=check.nodeid, index=-1, prompt=[],
                                                        outcome="skipped", location=str(check.location)))
    return report


def plugin_name_for_traceback(pm: pluggy.PluginManager, tb) -> str:
    """The plugin whose code raised: the innermost traceback frame in a plugin module or plugin object."""
    modules, objects = {}, {}
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        if hasattr(plugin, "__file__"):
            modules[plugin.__name__] = name
        else:
            objects[id(plugin)] = name
    found = ""
    while tb is not None:
        frame = tb.tb_frame
        owner = objects.get(id(frame.f_locals.get("self")))
        module = modules.get(frame.f_globals.get("__name__", ""))
        found = owner or module or found
        tb = tb.tb_next
    return found


#: Training conversations formatted in the format phase; large data is formatted with its masks, in batches.
FORMATTED_UP_FRONT = 2000


def import_training_libraries() -> None:
    """torch, transformers, TRL's trainer (which brings peft and bitsandbytes): seconds on the first spec
    of a process, timed as their own phase so "load" says what loading the model costs."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from trl import SFTTrainer  # noqa: F401


def _run_phases(item: SpecItem, run: SpecRun, report: SpecReport, hook) -> None:
    expectations = item.selected_expectations
    with _phase(report, item, "import"):
        import_training_libraries()
    with _phase(report, item, "load"):
        hook.sft_spec_run_progress(item=item, phase="load", step=0, total=0, loss=None)
        run.loaded = hook.sft_spec_load_model(item=item, config=run.config)
        if run.loaded is None:
            raise RuntimeError("no plugin loaded the model")
        run.model = run.loaded.model
        for note in run.loaded.notes:
            run.note(note)
        for check in run.loaded.after_run:  # added first, so they run after every other cleanup
            run.addfinalizer(lambda check=check: check(run))
    with _phase(report, item, "format"):
        run.markers = hook.sft_spec_chat_markers(item=item, run=run)
        # The conversations (up to a bound) and the prompts: a template's problem shows before anything is
        # generated. Past the bound the examples hook formats the rest with their masks (in batches).
        for index, conversation in enumerate(item.conversations[:FORMATTED_UP_FRONT]):
            try:
                run.formatted.append(hook.sft_spec_format(item=item, run=run, messages=conversation,
                                                          add_generation_prompt=False))
            except SpecError as exc:  # which conversation broke the template: a later one may be the odd one
                raise item.conversation_error(index, exc) from None
        run.prompts = [hook.sft_spec_format(item=item, run=run, messages=exp.prompt, add_generation_prompt=True)
                       for exp in expectations]
        for exp, prompt in zip(expectations, run.prompts, strict=True):
            try:
                prompt.max_new_tokens = hook.sft_spec_answer_budget(item=item, run=run, checks=exp.checks)
            except SpecError as exc:  # said where the expectation was written
                raise SpecError(exc.message, exp.location) from None
    prompts = dict(zip((e.index for e in expectations), run.prompts, strict=True))
    needs_base = [e for e in expectations if e.needs_base_answer or _needs_base(e, run.config)]
    if needs_base:
        with _phase(report, item, "generate_before"):
            hook.sft_spec_run_progress(item=item, phase="generate before", step=0, total=0, loss=None)
            answers = hook.sft_spec_generate(item=item, run=run, prompts=[prompts[e.index] for e in needs_base],
                                             when="before")
            run.base_answers = {e.index: a for e, a in zip(needs_base, answers, strict=True)}
    with _phase(report, item, "evaluate_before"):
        hook.sft_spec_evaluate(item=item, run=run)
    with _phase(report, item, "mask"):
        run.examples = hook.sft_spec_make_examples(item=item, run=run)
        if run.examples is None:
            raise RuntimeError("no plugin made the training examples")
        report.mask = _mask_summary(run)
    with _phase(report, item, "train"):
        trainer = hook.sft_spec_make_trainer(item=item, run=run, examples=run.examples)
        run.losses = list(hook.sft_spec_train(item=item, run=run, trainer=trainer) or [])
        report.losses = list(run.losses)
    with _phase(report, item, "generate"):
        hook.sft_spec_run_progress(item=item, phase="generate", step=0, total=0, loss=None)
        answers = hook.sft_spec_generate(item=item, run=run, prompts=run.prompts, when="after") if expectations \
            else []
        run.answers = {e.index: a for e, a in zip(expectations, answers, strict=True)}
    with _phase(report, item, "after_training"):
        hook.sft_spec_after_training(item=item, run=run)
    with _phase(report, item, "check"):
        hook.sft_spec_run_progress(item=item, phase="check", step=0, total=0, loss=None)
        for exp in expectations:
            report.expectations.append(hook.sft_spec_check(item=item, run=run, case=exp, answer=run.answers[exp.index],
                                                           base_answer=run.base_answers.get(exp.index)))
        for check in item.selected_training_checks:
            report.training_checks.append(hook.sft_spec_check(item=item, run=run, case=check, answer=None,
                                                              base_answer=None))


def _needs_base(exp: Expectation, config: Config) -> bool:
    registry = config.registry
    return any(registry.checks[name].needs_base_answer for name, _ in exp.checks if name in registry.checks)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return "out of memory" in str(exc).lower()


def _mask_summary(run: SpecRun) -> MaskSummary | None:
    if not len(run.examples):
        return None
    first = run.examples[0]
    ids, labels = (first["input_ids"], first["labels"]) if isinstance(first, dict) else (first.input_ids, first.labels)
    tokens = decode_tokens(run.loaded.tokenizer, ids)
    trained = [label != -100 for label in labels]
    if isinstance(first, dict):  # a datasets.Dataset of large data: summed in Arrow, never as Python lists
        import pyarrow.compute as pc

        columns = run.examples.with_format("arrow")
        if "trained" in run.examples.column_names:
            trained_tokens = pc.sum(columns["trained"]).as_py() or 0
        else:  # a plugin's dataset: counted from its labels
            carrying = pc.cast(pc.not_equal(pc.list_flatten(columns["labels"]), -100), "int64")
            trained_tokens = pc.sum(carrying).as_py() or 0
        total_tokens = pc.sum(pc.list_value_length(columns["input_ids"])).as_py() or 0
        fingerprints = {"fingerprint": str(getattr(run.examples, "_fingerprint", ""))}
    else:
        trained_tokens = sum(sum(1 for lab in ex.labels if lab != -100) for ex in run.examples)
        total_tokens = sum(len(ex.input_ids) for ex in run.examples)
        fingerprints = _fingerprints(run.examples)
    return MaskSummary(tokens=tokens, trained=trained,
                       trained_text="".join(t for t, on in zip(tokens, trained, strict=True) if on),
                       examples=len(run.examples), trained_tokens=trained_tokens, total_tokens=total_tokens,
                       **fingerprints)


#: Examples whose own fingerprint a report keeps (the whole set's is always kept).
FINGERPRINTED = 1000


def _fingerprints(examples) -> dict[str, Any]:
    import hashlib

    whole, text, each = hashlib.sha256(), hashlib.sha256(), []
    for example in examples:
        one = hashlib.sha256(json.dumps([example.input_ids, example.labels]).encode()).hexdigest()[:16]
        whole.update(one.encode())
        text.update(hashlib.sha256(example.formatted.text.encode("utf-8", "surrogatepass")).digest())
        if len(each) < FINGERPRINTED:
            each.append(one)
    return {"fingerprint": whole.hexdigest()[:16], "text_fingerprint": text.hexdigest()[:16],
            "example_fingerprints": each}


def decode_tokens(tokenizer, ids: list[int]) -> list[str]:
    """One string per token, for review. Byte-level tokenizers split a CJK character over several
    tokens that decode alone to U+FFFD; such a group decodes together and its text goes to its last
    token (the others get ""), so the strings still join to the text the model saw."""
    tokens: list[str] = []
    start = 0
    for i in range(len(ids)):
        text = tokenizer.decode(ids[start:i + 1])
        # A UTF-8 character is at most 4 bytes: a longer run is not a split character.
        if text.endswith("\ufffd") and i + 1 - start < 4 and i + 1 < len(ids):
            tokens.append("")
            continue
        tokens.append(text)
        start = i + 1
    return tokens


# -- the built-in check and report phases ------------------------------------------------------------


def _apply(ctx: CheckContext, name: str, argument: Any, answer: str, on: str) -> CheckReport:
    check = ctx.run.config.registry.checks[name]
    result = check.func(answer, argument, ctx)
    shown = getattr(argument, "shown", argument)  # an eval set shows its name and size, not its rows
    return CheckReport(name=name, argument=shown, passed=result.passed, message=result.message, on=on,
                       expected=result.expected, score=result.score)


@hookimpl(trylast=True)
def sft_spec_check(item: SpecItem, run: SpecRun, case: Case, answer: Answer | None,
                   base_answer: Answer | None) -> ExpectationReport:
    base_text = base_answer.text if base_answer is not None else None
    prompt = None
    if isinstance(case, Expectation) and len(run.prompts) == len(item.selected_expectations) and case.selected:
        prompt = run.prompts[item.selected_expectations.index(case)]
    ctx = CheckContext(item=item, run=run, case=case, answer=answer, base_answer=base_text, losses=run.losses,
                       prompt=prompt)
    if isinstance(case, Expectation):
        report = ExpectationReport(
            nodeid=case.nodeid, index=case.index, prompt=case.prompt, location=str(case.location),
            answer=answer.text if answer else None, raw_answer=answer.raw if answer else None, base_answer=base_text,
            stopped=answer.stopped if answer else None, max_new_tokens=answer.max_new_tokens if answer else None,
        )
        report.checks += [_apply(ctx, name, arg, base_text or "", "before") for name, arg in case.before]
        report.checks += [_apply(ctx, name, arg, answer.text if answer else "", "after") for name, arg in case.checks]
        if answer is not None and not answer.stopped:  # the classic broken recipe: say it with every failure
            for check in report.checks:
                if check.on == "after" and not check.passed and check.name != "stops":
                    check.message += (f" (generation stopped at max_new_tokens={answer.max_new_tokens} before the "
                                      "end of turn)")
    else:
        report = ExpectationReport(nodeid=case.nodeid, index=-1, prompt=[], location=str(case.location),
                                   checks=[_apply(ctx, case.name, case.argument, "", "after")])
    report.outcome = "passed" if all(c.passed for c in report.checks) else "failed"
    return apply_xfail(report, case.xfail or item.spec.xfail)


def apply_xfail(report: ExpectationReport, xfail) -> ExpectationReport:
    """A case's final outcome from its checks and its xfail (its own, or its spec's, as pytest's class mark)."""
    if xfail is not None:
        report.xfail_reason = xfail.reason
        if report.outcome == "failed":
            report.outcome = "xfailed"
        elif xfail.strict:
            report.outcome = "failed"
            report.checks.append(CheckReport(XPASS_STRICT, True, False, f"[XPASS(strict)] {xfail.reason}: the "
                                             "checks passed, and this case is marked to fail"))
        else:
            report.outcome = "xpassed"
    return report


def spec_outcome(item: SpecItem, report: SpecReport) -> str:
    """The spec's outcome from its cases' final outcomes (xfail was decided per case, by the check hook)."""
    outcomes = {case.outcome for case in report.cases}
    if "failed" in outcomes:
        return "failed"
    if item.spec.xfail:
        return "xfailed" if "xfailed" in outcomes else "xpassed"
    return "passed"


@hookimpl(trylast=True)
def sft_spec_make_report(item: SpecItem, run: SpecRun, report: SpecReport) -> SpecReport:
    report.outcome = spec_outcome(item, report)
    return report
