"""The built-in checks of the spec format: on answers (``expect``) and on training (``checks:``)."""

from __future__ import annotations

import difflib
import math
import re
from typing import Any

from sft_spec import hookimpl
from sft_spec.registry import Check, CheckContext, CheckResult


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else f"expected a string, got {type(value).__name__} {value!r}"


def _strings(value: Any) -> str | None:
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        return None
    return f"expected a string or a list of strings, got {value!r}"


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def equals(answer: str, expected: str, ctx: CheckContext) -> CheckResult:
    ok = answer == expected
    return CheckResult(ok, "" if ok else f"expected {expected!r}, got {answer!r}", expected=expected)


def not_equals(answer: str, unexpected: str, ctx: CheckContext) -> CheckResult:
    ok = answer != unexpected
    return CheckResult(ok, "" if ok else f"expected anything but {unexpected!r}")


def contains(answer: str, needles: Any, ctx: CheckContext) -> CheckResult:
    missing = [n for n in _as_list(needles) if n not in answer]
    return CheckResult(not missing, f"missing {', '.join(map(repr, missing))} in {answer!r}" if missing else "")


def not_contains(answer: str, needles: Any, ctx: CheckContext) -> CheckResult:
    present = [n for n in _as_list(needles) if n in answer]
    return CheckResult(not present, f"unexpected {', '.join(map(repr, present))} in {answer!r}" if present else "")


def startswith(answer: str, prefix: str, ctx: CheckContext) -> CheckResult:
    ok = answer.startswith(prefix)
    return CheckResult(ok, "" if ok else f"expected to start with {prefix!r}, got {answer!r}",
                       expected=None if ok else prefix)


def _valid_regex(value: Any) -> str | None:
    if not isinstance(value, str):
        return _string(value)
    try:
        re.compile(value)
    except re.error as exc:
        return f"invalid regular expression {value!r}: {exc}"
    return None


def regex(answer: str, pattern: str, ctx: CheckContext) -> CheckResult:
    ok = re.search(pattern, answer) is not None
    return CheckResult(ok, "" if ok else f"{answer!r} does not match /{pattern}/")


def _valid_similar(value: Any) -> str | None:
    if not isinstance(value, dict) or "to" not in value:
        return "similar: expected {to: TEXT, at_least: 0.8}"
    unknown = set(value) - {"to", "at_least"}
    if unknown:
        return f"similar: unknown key(s) {', '.join(sorted(unknown))} (expected to, at_least)"
    if not isinstance(value["to"], str):
        return "similar.to: expected a string"
    at_least = value.get("at_least", 0.8)
    if isinstance(at_least, bool) or not isinstance(at_least, int | float) or not 0 <= at_least <= 1:
        return f"similar.at_least: expected a number from 0 to 1, got {at_least!r}"
    return None


def similarity(a: str, b: str) -> float:
    """Character-level ratio (difflib), right for text without spaces."""
    return difflib.SequenceMatcher(a=a, b=b, autojunk=False).ratio()


def similar(answer: str, target: dict, ctx: CheckContext) -> CheckResult:
    at_least = target.get("at_least", 0.8)
    score = similarity(answer, target["to"])
    ok = score >= at_least
    return CheckResult(ok, f"similarity {score:.2f} (needs {at_least})", expected=None if ok else target["to"])


def _valid_number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected a number, got {value!r}"
    return None


def _valid_true(value: Any) -> str | None:
    return None if value is True else f"expected true, got {value!r}"


def final_loss_below(_: str, limit: float, ctx: CheckContext) -> CheckResult:
    if not ctx.losses:
        return CheckResult(False, "no loss was logged")
    final = ctx.losses[-1]
    ok = not math.isnan(final) and final < limit
    return CheckResult(ok, f"final loss {final:.4g} {'<' if ok else '>='} {limit}")


def loss_decreased(_: str, expected: bool, ctx: CheckContext) -> CheckResult:
    if len(ctx.losses) < 2:
        return CheckResult(False, "fewer than two losses were logged")
    first, last = ctx.losses[0], ctx.losses[-1]
    return CheckResult(last < first, f"loss {first:.4g} -> {last:.4g}")


ANSWER_CHECKS = [
    Check("equals", equals, "the answer is exactly the string", _string),
    Check("not_equals", not_equals, "the answer is not exactly the string", _string),
    Check("contains", contains, "the answer contains the string (a list: every string)", _strings),
    Check("not_contains", not_contains, "the answer lacks the string (a list: every string)", _strings),
    Check("startswith", startswith, "the answer starts with the string", _string),
    Check("regex", regex, "the answer matches the Python regular expression (search)", _valid_regex),
    Check("similar", similar, "{to, at_least}: character-level similarity ratio", _valid_similar),
]
TRAINING_CHECKS = [
    Check("final_loss_below", final_loss_below, "the last logged loss is below the number", _valid_number,
          scope="training"),
    Check("loss_decreased", loss_decreased, "the last logged loss is below the first", _valid_true,
          scope="training"),
]


@hookimpl(trylast=True)
def sft_spec_register_checks(register) -> None:
    for check in ANSWER_CHECKS + TRAINING_CHECKS:
        register(check)
