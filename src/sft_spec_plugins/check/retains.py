"""Forgetting probes: ``retains: true`` (or ``{similar: 0.8}``) on an expectation.

The answer after training must be the base model's answer before training. Base answers are asked for
once per base model: they are cached for the run (``config.stash``) by what decides them (the model,
the device, 4-bit or not, the prompt as formatted text, the generation settings), so ten specs that
share a base model and a probe generate its base answer once. They are kept between runs too, beside
the result cache (``<cache dir>/base-answers``, not under ``--no-cache``), keyed also by the model's
weights, the library versions and sft-spec's code: a pull request that changes the recipe but not the
base model or its prompts generates no base answer again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from sft_spec import hookimpl
from sft_spec.registry import Check, CheckContext, CheckResult
from sft_spec.state import Answer, StashKey

from .checks import similarity
from .generation import GENERATION

#: Base answers of this run, by what decides them.
BASE_ANSWERS = StashKey[dict[str, Answer]]()


def _valid(value: Any) -> str | None:
    if value is True:
        return None
    if isinstance(value, dict) and set(value) == {"similar"}:
        at_least = value["similar"]
        if not isinstance(at_least, bool) and isinstance(at_least, int | float) and 0 <= at_least <= 1:
            return None
        return f"retains.similar: expected a number from 0 to 1, got {at_least!r}"
    return f"retains: expected true or {{similar: 0.8}}, got {value!r}"


def retains(answer: str, argument: Any, ctx: CheckContext) -> CheckResult:
    base = ctx.base_answer
    if base is None:
        return CheckResult(False, "no base answer was generated before training")
    if argument is True:
        ok = answer == base
        return CheckResult(ok, "" if ok else f"forgot the base model's answer {base!r}", expected=base)
    at_least = argument["similar"]
    score = similarity(answer, base)
    ok = score >= at_least
    return CheckResult(ok, f"similarity to the base answer {score:.2f} (needs {at_least})",
                       expected=None if ok else base)


@hookimpl
def sft_spec_register_checks(register) -> None:
    register(Check("retains", retains, "true or {similar: 0.8}: the answer is (close to) the base model's "
                   "answer before training (a forgetting probe)", _valid, needs_base_answer=True))


def _key(item, run, text: str, budget: int | None) -> str:
    """Everything that decides a base answer: the model and how it was loaded, the prompt, how it is generated
    and where generation stops (a spec's eos_token or pad_token changes both the tokenizer and the stop)."""
    from .generation import stop_token_ids

    spec, tokenizer = item.spec, run.loaded.tokenizer
    stops = stop_token_ids(tokenizer, run.model, run.markers.end_of_turn if run.markers else None)
    return json.dumps([spec.model.model_dump(), run.loaded.device, spec.method == "qlora", spec.quantization,
                       text, item.section(GENERATION).model_dump(), budget, stops, tokenizer.eos_token,
                       tokenizer.pad_token, {k: spec.training.get(k) for k in ("eos_token", "pad_token", "seed")}],
                      sort_keys=True, default=str)


def _stored(item, run, keys: list[str]) -> list[Path | None]:
    """Where each base answer is kept between runs; None under ``--no-cache`` (everything fresh). What the
    keys share (the model's weights, the code, the libraries) is worked out once, not per prompt."""
    if run.config.getoption("no_cache", False):
        return [None] * len(keys)
    from ..common import recorded as rec
    from ..model.models import model_identity

    shared = rec.sha256([model_identity(item), rec.code_and_versions(), run.loaded.dtype])
    folder = Path(run.config.cache_dir) / "base-answers"
    return [folder / f"{rec.sha256([key, shared])}.json" for key in keys]


def _read_stored(path: Path | None) -> Answer | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError):
        return None  # none yet, or a damaged file: generated again
    names = {f.name for f in dataclasses.fields(Answer)}
    if not isinstance(data, dict) or set(data) != names or not isinstance(data.get("text"), str):
        return None
    return Answer(**data)


@hookimpl(tryfirst=True)
def sft_spec_generate(item, run, prompts, when):
    """Base answers seen before, in this run or an earlier one, come from the cache; only the others reach
    the model."""
    if when != "before":
        return None
    cache = run.config.stash.setdefault(BASE_ANSWERS, {})
    keys = [_key(item, run, p.text, p.max_new_tokens) for p in prompts]
    unseen = [k for k in keys if k not in cache]
    for key, path in zip(unseen, _stored(item, run, unseen), strict=True):
        if (kept := _read_stored(path)) is not None:
            cache[key] = kept
            run.metrics["base_answers_from_cache_dir"] = run.metrics.get("base_answers_from_cache_dir", 0) + 1
    missing = [i for i, k in enumerate(keys) if k not in cache]
    if len(missing) == len(keys):
        return None  # nothing cached: the generator answers them all (and record_base_answers keeps them)
    if missing:
        run.config.hook.sft_spec_generate(item=item, run=run, prompts=[prompts[i] for i in missing], when=when)
    run.metrics["base_answers_reused"] = run.metrics.get("base_answers_reused", 0) + len(keys) - len(missing)
    return [dataclasses.replace(cache[k]) for k in keys]


@hookimpl(wrapper=True, specname="sft_spec_generate")
def record_base_answers(item, run, prompts, when):
    answers = yield
    if when == "before" and answers is not None:
        from ..common.files import atomic_write_text

        cache = run.config.stash.setdefault(BASE_ANSWERS, {})
        new = {}
        for prompt, answer in zip(prompts, answers, strict=True):
            key = _key(item, run, prompt.text, prompt.max_new_tokens)
            if key not in cache:
                cache[key] = new[key] = dataclasses.replace(answer)
        for answer, path in zip(new.values(), _stored(item, run, list(new)), strict=True):
            if path is not None:
                try:
                    atomic_write_text(path, json.dumps(dataclasses.asdict(answer), ensure_ascii=False))
                except OSError:  # a read-only cache: this run's answers are still right
                    pass
    return answers
