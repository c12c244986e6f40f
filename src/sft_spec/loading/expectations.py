"""``expect:`` and ``checks:``: each entry becomes a test case with its own id and location."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pydantic

from ..errors import Location, SpecError, did_you_mean
from ..registry import Check
from ..spec import Message, Spec, XfailSpec, xfail_shorthand
from ..state import Expectation, TrainingCheck
from .data import check_conversation
from .wording import keypath_str, pydantic_errors
from .yamlsource import KeyPath, LocatedDocument

if TYPE_CHECKING:
    from . import LoadContext

EXPECTATION_KEYS = ("prompt", "before", "xfail")
#: A longer prompt is refused: generation costs grow with it, and a spec is a short test.
MAX_PROMPT_CHARS = 16_384


def plugin_validate(validate: Any, value: Any, what: str) -> str | None:
    """A plugin's own validation; if it crashes on odd input, that is this spec's error, not the run's."""
    if validate is None:
        return None
    try:
        return validate(value)
    except Exception as exc:  # noqa: BLE001 - reported as the spec's problem
        return f"{what} could not check this value: {type(exc).__name__}: {str(exc)[:200]}"


def _parse_checks(entry: dict, keypath: KeyPath, doc: LocatedDocument, ctx: LoadContext,
                  errors: list[SpecError], allowed: tuple[str, ...]) -> list[tuple[str, Any]]:
    checks = []
    answer_checks = [n for n, c in ctx.config.registry.checks.items() if c.scope == "answer"]
    for key, value in entry.items():
        if key in allowed:
            continue
        where = doc.locate(keypath + (key,))
        dotted = keypath_str(keypath + (key,))
        check: Check | None = ctx.config.registry.checks.get(str(key))
        if check is None or check.scope != "answer":
            errors.append(SpecError(did_you_mean(str(key), answer_checks + list(allowed), "check"), where,
                                    key=dotted))
            continue
        problem = plugin_validate(check.validate, value, f"check {check.name!r}")
        if problem:
            errors.append(SpecError(problem, where, key=dotted))
            continue
        checks.append((str(key), value))
    return checks


def build_expectations(spec: Spec, nodeid: str, doc: LocatedDocument, ctx: LoadContext,
                        errors: list[SpecError]) -> list[Expectation]:
    out = []
    for i, entry in enumerate(spec.expect):
        keypath: KeyPath = ("expect", i)
        where = doc.locate(keypath)
        if "prompt" not in entry:
            errors.append(SpecError("an expectation needs a prompt", where, key=f"expect[{i}]"))
            continue
        prompt = _parse_prompt(entry["prompt"], keypath + ("prompt",), doc, errors)
        if prompt and sum(len(t["content"]) for t in prompt) > MAX_PROMPT_CHARS:
            errors.append(SpecError(f"the prompt has {sum(len(t['content']) for t in prompt)} characters; a prompt "
                                    f"may have {MAX_PROMPT_CHARS}", doc.locate(keypath + ("prompt",)),
                                    key=f"expect[{i}].prompt"))
            prompt = None
        checks = _parse_checks(entry, keypath, doc, ctx, errors, EXPECTATION_KEYS)
        before: list[tuple[str, Any]] = []
        if "before" in entry:
            if not isinstance(entry["before"], dict) or not entry["before"]:
                errors.append(SpecError("before: expected a mapping of checks, e.g. {not_equals: ...}",
                                        doc.locate(keypath + ("before",)), key=f"expect[{i}].before"))
            else:
                before = _parse_checks(entry["before"], keypath + ("before",), doc, ctx, errors, ())
        if not checks and not before and not any(k not in EXPECTATION_KEYS for k in entry):
            errors.append(SpecError("an expectation needs at least one check (equals, contains, regex, ...)",
                                    where, key=f"expect[{i}]"))
        xfail = None
        if "xfail" in entry:
            xfail = _parse_xfail(entry["xfail"], doc.locate(keypath + ("xfail",)), f"expect[{i}].xfail", errors)
        if prompt is not None:
            out.append(Expectation(i, f"{nodeid}::expect[{i}]", prompt, checks, before, where, xfail=xfail))
    return out


def _parse_xfail(value: Any, where: Location, dotted: str, errors: list[SpecError]) -> XfailSpec | None:
    """An expectation's ``xfail``: the same forms as the spec's (a reason, true, or {reason, strict})."""
    if value is False or value is None:
        return None
    try:
        return XfailSpec.model_validate(xfail_shorthand(value))
    except pydantic.ValidationError:
        errors.append(SpecError("expected a reason (string), true, or a mapping with reason and strict",
                                where, key=dotted))
        return None


def _parse_prompt(value: Any, keypath: KeyPath, doc: LocatedDocument,
                  errors: list[SpecError]) -> list[dict] | None:
    where = doc.locate(keypath)
    dotted = keypath_str(keypath)
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        turns = []
        for j, turn in enumerate(value):
            try:
                turns.append(Message.model_validate(turn).model_dump())
            except pydantic.ValidationError as exc:
                turn_doc = LocatedDocument(turn, {(): doc.locate(keypath + (j,))}, doc.path)
                for e in pydantic_errors(exc, turn_doc, {(): Message}):
                    errors.append(SpecError(e.message, doc.locate(keypath + (j,)), key=f"{dotted}[{j}]"))
                return None
        if turns[-1]["role"] != "user":
            errors.append(SpecError(f"the last turn of a prompt must be a user turn (the model answers it), "
                                    f"got {turns[-1]['role']!r}", where, key=dotted))
            return None
        problem = check_conversation(turns + [{"role": "assistant", "content": ""}])
        if problem:
            errors.append(SpecError(problem.replace("must end with an assistant", "must end with a user")
                                    + " (a prompt ends with the user turn to answer)", where, key=dotted))
            return None
        return turns
    errors.append(SpecError("prompt must be a string (one user turn) or a list of {role, content} turns",
                            where, key=dotted))
    return None


def build_training_checks(spec: Spec, nodeid: str, doc: LocatedDocument, ctx: LoadContext,
                          errors: list[SpecError]) -> list[TrainingCheck]:
    out = []
    training_checks = [n for n, c in ctx.config.registry.checks.items() if c.scope == "training"]
    for key, value in spec.checks.items():
        where = doc.locate(("checks", key))
        check = ctx.config.registry.checks.get(key)
        if check is None or check.scope != "training":
            errors.append(SpecError(did_you_mean(key, training_checks, "training check"), where,
                                    key=f"checks.{key}"))
            continue
        problem = plugin_validate(check.validate, value, f"check {check.name!r}")
        if problem:
            errors.append(SpecError(problem, where, key=f"checks.{key}"))
            continue
        out.append(TrainingCheck(key, value, f"{nodeid}::checks[{key}]", where))
    return out
