"""The run protocol of one spec: load -> base answers -> format -> mask -> train -> generate -> check.

Each arrow is a hook, so a plugin can replace any phase. This module is the internal plugin that
implements ``sft_spec_run_spec`` and ``sft_spec_check``; it imports no torch itself.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import hookimpl
from .errors import SkipSpec, SpecError, SpecTimeout
from .plugins import plugin_name_for_traceback
from .registry import CheckContext, MaskedExample
from .reports import XPASS_STRICT, CheckReport, ErrorInfo, ExpectationReport, MaskSummary, SpecReport

if TYPE_CHECKING:
    from .config import Config
    from .loader import Expectation, SpecItem
    from .session import Session


@dataclass
class LoadedModel:
    """A model ready to train, with what generation and masking need to know about its chat format."""

    model: Any
    tokenizer: Any
    device: str
    source: str  # what was loaded, for reports
    end_of_turn: str | None = None  # e.g. "<end_of_turn>": generation stops there, masks should train it
    stop_token_ids: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what loading changed from what was asked, for every report


@dataclass
class SpecRun:
    """State of one spec while it runs; plugins read and add to it."""

    item: SpecItem
    config: Config
    loaded: LoadedModel | None = None
    model: Any = None  # the model being trained (a peft model for LoRA)
    notes: list[str] = field(default_factory=list)  # what the harness changed, shown in every report
    settings: dict[str, Any] = field(default_factory=dict)  # effective recipe settings
    metrics: dict[str, Any] = field(default_factory=dict)
    examples: list[MaskedExample] = field(default_factory=list)
    finalizers: list[Callable[[], None]] = field(default_factory=list)
    scratch: dict[str, Any] = field(default_factory=dict)  # plugins' per-spec memo (chat markers, ...)

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def addfinalizer(self, fn: Callable[[], None]) -> None:
        """Called after the spec, even when it failed (e.g. to remove LoRA adapters from a shared base)."""
        self.finalizers.append(fn)


class PhaseError(Exception):
    def __init__(self, phase: str, original: BaseException):
        super().__init__(str(original))
        self.phase = phase
        self.original = original


@contextmanager
def _phase(report: SpecReport, item: SpecItem, name: str):
    start = time.perf_counter()
    try:
        yield
    except SpecError as exc:
        exc.phase = getattr(exc, "phase", None) or name
        if exc.location is None and item.doc is not None:
            exc.location = item.doc.locate(_PHASE_KEYS.get(name, ()))
        raise
    except (SkipSpec, KeyboardInterrupt, PhaseError):
        raise
    except (Exception, SpecTimeout) as exc:
        raise PhaseError(name, exc) from exc
    finally:
        report.phases[name] = report.phases.get(name, 0.0) + time.perf_counter() - start


#: The spec key each phase's problems most likely come from, for error locations.
_PHASE_KEYS = {"load": ("model",), "format": ("format",), "mask": ("format", "collator"), "train": ("training",)}



def _new_report(item: SpecItem) -> SpecReport:
    spec = item.spec
    return SpecReport(
        nodeid=item.nodeid, path=str(item.location.path), name=item.name, variant=item.variant, outcome="passed",
        tags=list(spec.tags), model=spec.model.id, method=spec.method, notes=list(item.notes),
        xfail_reason=spec.xfail.reason if spec.xfail else "",
    )


@hookimpl(trylast=True)
def sft_spec_run_spec(item: SpecItem, session: Session) -> SpecReport:
    report = _new_report(item)
    start = time.perf_counter()
    config = session.config
    hook = config.hook
    if item.spec.skip:
        report.outcome = "skipped"
        report.skip_reason = item.spec.skip
        _mark_cases(item, report, "skipped")
        return report
    run = SpecRun(item=item, config=config)
    try:
        _run_phases(item, run, report, hook)
    except SkipSpec as exc:
        report.outcome = "skipped"
        report.skip_reason = str(exc)
        _mark_cases(item, report, "skipped")
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
        original = exc.original
        report.outcome = "error"
        kind = "oom" if _is_oom(original) else "timeout" if isinstance(original, SpecTimeout) else "error"
        message = f"{type(original).__name__}: {original}"
        if kind == "oom":
            message = f"out of memory in phase {exc.phase}: {original}"
        elif kind == "timeout":
            message = f"timed out in phase {exc.phase}: {original}"
        elif isinstance(original, FloatingPointError):
            kind = "nan"
        report.error = ErrorInfo(
            message=message, location=str(item.location), phase=exc.phase,
            plugin=plugin_name_for_traceback(config.pluginmanager, original.__traceback__), kind=kind,
            traceback="".join(traceback.format_exception(original)),
        )
    finally:
        for fn in reversed(run.finalizers):
            try:
                fn()
            except Exception as exc:  # cleanup must not hide the spec's own result
                run.note(f"cleanup failed: {type(exc).__name__}: {exc}")
        report.duration = time.perf_counter() - start
        report.notes.extend(n for n in run.notes if n not in report.notes)
        report.settings = run.settings
        report.metrics.update(run.metrics)
        if item.spec.xfail:
            report.metrics["xfail_strict"] = item.spec.xfail.strict
    if report.outcome not in ("error", "skipped", "interrupted"):
        report = hook.sft_spec_make_report(item=item, run=run, report=report)
    return report


def _run_phases(item: SpecItem, run: SpecRun, report: SpecReport, hook) -> None:
    config = run.config
    expectations = item.selected_expectations
    with _phase(report, item, "load"):
        hook.sft_spec_run_progress(item=item, phase="load", step=0, total=0, loss=None)
        run.loaded = hook.sft_spec_load_model(item=item, config=config)
        if run.loaded is None:
            raise RuntimeError("no plugin loaded the model")
        run.model = run.loaded.model
        for note in run.loaded.notes:
            run.note(note)
    needs_base = [e for e in expectations if e.needs_base_answer or _needs_base(e, config)]
    base_answers: dict[int, dict] = {}
    if needs_base:
        with _phase(report, item, "generate_before"):
            hook.sft_spec_run_progress(item=item, phase="generate before", step=0, total=0, loss=None)
            answers = hook.sft_spec_generate(item=item, run=run, prompts=[e.prompt for e in needs_base])
            base_answers = {e.index: a for e, a in zip(needs_base, answers, strict=True)}
    with _phase(report, item, "format"):
        formatted = [
            hook.sft_spec_format(item=item, run=run, messages=conv, add_generation_prompt=False)
            for conv in item.conversations
        ]
    with _phase(report, item, "mask"):
        run.examples = [hook.sft_spec_make_mask(item=item, run=run, formatted=f) for f in formatted]
        report.mask = _mask_summary(run)
    with _phase(report, item, "train"):
        trainer = hook.sft_spec_make_trainer(item=item, run=run, examples=run.examples)
        report.losses = list(hook.sft_spec_train(item=item, run=run, trainer=trainer) or [])
    with _phase(report, item, "generate"):
        hook.sft_spec_run_progress(item=item, phase="generate", step=0, total=0, loss=None)
        prompts = [e.prompt for e in expectations]
        answers = hook.sft_spec_generate(item=item, run=run, prompts=prompts) if expectations else []
    with _phase(report, item, "check"):
        for exp, answer in zip(expectations, answers, strict=True):
            base = base_answers.get(exp.index)
            exp_report = hook.sft_spec_check(
                item=item, run=run, expectation=exp, answer=answer,
                base_answer=base,
            )
            report.expectations.append(exp_report)
        for name, argument, location in item.training_checks:
            report.training_checks.append(_training_check(item, run, report, name, argument, str(location)))


def _needs_base(exp: Expectation, config: Config) -> bool:
    registry = config.registry
    return any(registry.checks[name].needs_base_answer for name, _ in exp.checks if name in registry.checks)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return "out of memory" in str(exc).lower()


def _mask_summary(run: SpecRun) -> MaskSummary | None:
    if not run.examples:
        return None
    first = run.examples[0]
    tokenizer = run.loaded.tokenizer
    tokens = decode_tokens(tokenizer, first.input_ids)
    trained = [label != -100 for label in first.labels]
    return MaskSummary(
        tokens=tokens, trained=trained,
        trained_text="".join(t for t, on in zip(tokens, trained, strict=True) if on),
        examples=len(run.examples),
        trained_tokens=sum(sum(1 for lab in ex.labels if lab != -100) for ex in run.examples),
        total_tokens=sum(len(ex.input_ids) for ex in run.examples),
    )


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


def _apply(config: Config, name: str, argument: Any, answer: str, ctx: CheckContext, on: str) -> CheckReport:
    check = config.registry.checks[name]
    result = check.func(answer, argument, ctx)
    return CheckReport(name=name, argument=argument, passed=result.passed, message=result.message, on=on,
                       expected=result.expected)


@hookimpl(trylast=True)
def sft_spec_check(item: SpecItem, run: SpecRun, expectation: Expectation, answer: dict,
                   base_answer: dict | None) -> ExpectationReport:
    config = run.config
    base_text = base_answer["text"] if base_answer else None
    ctx = CheckContext(expectation=expectation, base_answer=base_text, item=item)
    report = ExpectationReport(
        nodeid=expectation.nodeid, index=expectation.index, prompt=expectation.prompt,
        answer=answer["text"], raw_answer=answer.get("raw"), base_answer=base_text,
        location=str(expectation.location),
    )
    for name, argument in expectation.before:
        report.checks.append(_apply(config, name, argument, base_text or "", ctx, "before"))
    for name, argument in expectation.checks:
        report.checks.append(_apply(config, name, argument, answer["text"], ctx, "after"))
    report.outcome = "passed" if all(c.passed for c in report.checks) else "failed"
    return report


def _training_check(item: SpecItem, run: SpecRun, report: SpecReport, name: str, argument: Any,
                    location: str) -> ExpectationReport:
    ctx = CheckContext(losses=report.losses, item=item)
    check = _apply(run.config, name, argument, "", ctx, "after")
    return ExpectationReport(
        nodeid=f"{item.nodeid}::checks[{name}]", index=-1, prompt=[], checks=[check],
        outcome="passed" if check.passed else "failed", location=location,
    )


def _mark_cases(item: SpecItem, report: SpecReport, outcome: str) -> None:
    for exp in item.selected_expectations:
        report.expectations.append(ExpectationReport(
            nodeid=exp.nodeid, index=exp.index, prompt=exp.prompt, outcome=outcome, location=str(exp.location),
        ))


@hookimpl(trylast=True)
def sft_spec_make_report(item: SpecItem, run: SpecRun, report: SpecReport) -> SpecReport:
    _decide_outcome(item, report)
    return report


def _decide_outcome(item: SpecItem, report: SpecReport) -> None:
    expected_to_fail = {e.index: e.xfail for e in item.expectations if e.xfail}
    for case in report.expectations:
        xfail = expected_to_fail.get(case.index)
        if xfail is None or case.outcome not in ("passed", "failed"):
            continue
        case.xfail_reason = xfail.reason
        if case.outcome == "failed":
            case.outcome = "xfailed"
        elif xfail.strict:
            case.outcome = "failed"
            case.checks.append(CheckReport(XPASS_STRICT, True, False, f"[XPASS(strict)] {xfail.reason}: the "
                                           "checks passed, and this expectation is marked to fail"))
        else:
            case.outcome = "xpassed"
    failed = any(c.outcome == "failed" for c in report.cases)
    if item.spec.xfail:
        # The spec is the unit that is expected to fail: all its cases share its outcome.
        for case in report.cases:
            case.outcome = "xfailed" if failed else "xpassed"
        report.outcome = "xfailed" if failed else "xpassed"
    else:
        report.outcome = "failed" if failed else "passed"
