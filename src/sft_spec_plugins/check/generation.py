"""Greedy generation for expectations, batched with left padding, stopping at the end of the turn.

When a spec does not set ``generation.max_new_tokens``, each answer's budget comes from its reference
(the text its checks expect: ``equals``, ``startswith``, a metric's ``to``): the reference's token count
plus a margin, never less than the default, so a long expected answer is not cut by a default. The
budget used is in every report (``max_new_tokens`` of each expectation).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from sft_spec import hookimpl
from sft_spec.errors import SpecError
from sft_spec.registry import SpecSection
from sft_spec.state import Answer


class GenerationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(32, gt=0, description="Tokens to generate per expectation. Unset: each "
                                "expectation's own budget, its reference's token count plus a margin and at "
                                "least this default; set: exactly this many for every expectation")
    do_sample: bool = Field(False, description="Greedy by default, so results are reproducible")
    temperature: float | None = Field(None, description="Sampling temperature (with do_sample)")
    top_p: float | None = Field(None, description="Nucleus sampling probability mass (with do_sample)")
    top_k: int | None = Field(None, description="Sample from the k likeliest tokens (with do_sample)")
    num_beams: int = Field(1, gt=0, description="Beam search width; 1 is greedy")
    repetition_penalty: float | None = Field(None, description="Penalty above 1.0 discourages repeats")
    batch_size: int = Field(16, gt=0, description="Prompts generated together (left-padded) in one call")


GENERATION = SpecSection("generation", GenerationSpec, "How answers are generated for expect", default=True)


@hookimpl
def sft_spec_register_spec_sections(register) -> None:
    register(GENERATION)


@hookimpl(wrapper=True)
def sft_spec_make_trainer(item, run, examples):
    """The recipe's settings, as reports show them, hold how answers were generated: this plugin's own part."""
    trainer = yield
    if run.settings is not None:
        run.settings["generation"] = item.section(GENERATION).model_dump()
    return trainer


@hookimpl
def sft_spec_validate_spec(item, config):
    """Values the schema accepts and ``generate`` would reject, each located at its own key."""
    from sft_spec.errors import SpecError

    gen, errors = item.section(GENERATION), []
    if gen is None:
        return errors
    if gen.do_sample and gen.temperature is not None and gen.temperature <= 0:
        errors.append(SpecError(f"temperature {gen.temperature!r} with do_sample: true cannot sample (it must be "
                                "> 0; for greedy answers set do_sample: false)", item.locate("generation",
                                "temperature"), key="generation.temperature"))
    if gen.top_p is not None and not 0 < gen.top_p <= 1:
        errors.append(SpecError(f"top_p {gen.top_p!r}: expected a probability mass in (0, 1]",
                                item.locate("generation", "top_p"), key="generation.top_p"))
    if gen.top_k is not None and gen.top_k < 1:
        errors.append(SpecError(f"top_k {gen.top_k!r}: expected at least 1", item.locate("generation", "top_k"),
                                key="generation.top_k"))
    if gen.repetition_penalty is not None and gen.repetition_penalty <= 0:
        errors.append(SpecError(f"repetition_penalty {gen.repetition_penalty!r}: expected a number > 0",
                                item.locate("generation", "repetition_penalty"), key="generation.repetition_penalty"))
    if not gen.do_sample:  # transformers ignores them when greedy: said, not dropped in silence
        for key in ("temperature", "top_p", "top_k"):
            if getattr(gen, key) is not None and not any(key in n and "do_sample" in n for n in item.notes):
                item.notes.append(f"{item.locate('generation', key)}: note: generation.{key} is not used: answers "
                                  "are greedy (set do_sample: true to sample)")
    return errors


#: Checks whose ``to`` is scored by teacher forcing, never compared with a generated answer: no budget.
SCORED_NOT_GENERATED = ("likelihood", "perplexity")


def references(checks: list[tuple[str, object]]) -> list[str]:
    """The texts an expectation's checks expect the answer to be (or to be close to)."""
    out = []
    for name, argument in checks:
        if name in ("equals", "startswith") and isinstance(argument, str):
            out.append(argument)
        elif isinstance(argument, dict) and isinstance(argument.get("to"), str) and name not in SCORED_NOT_GENERATED:
            out.append(argument["to"])
        elif name == "contains":
            out.append("".join([argument] if isinstance(argument, str) else argument))
    return out


@hookimpl(trylast=True)
def sft_spec_answer_budget(item, run, checks) -> int | None:
    return answer_budget(item, run, checks)


def answer_budget(item, run, checks: list[tuple[str, object]]) -> int | None:
    """``max_new_tokens`` for one answer: None when the spec sets it; else from the longest reference."""
    generation = item.section(GENERATION)
    if generation is None or "max_new_tokens" in generation.model_fields_set:
        return None
    texts = references(checks)
    if not texts:
        return None
    tokens = max(len(run.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
    budget = max(generation.max_new_tokens, tokens + max(8, tokens // 2))
    if budget > MAX_DERIVED_BUDGET:  # a 300 KB reference once asked for a 450,000-token answer
        raise SpecError(f"the reference is {tokens:,} tokens: the answer budget derived from it ({budget:,} tokens) "
                        f"is past the {MAX_DERIVED_BUDGET:,} sft-spec derives by itself; set "
                        "generation.max_new_tokens to generate that much")
    return budget


#: The largest answer budget derived from a reference; a spec that wants more says so in generation:.
MAX_DERIVED_BUDGET = 4096


def stop_token_ids(tokenizer, model, end_of_turn: str | None) -> list[int]:
    ids: list[int] = []
    if end_of_turn:
        token_id = tokenizer.convert_tokens_to_ids(end_of_turn)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.append(token_id)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token_id in configured if isinstance(configured, list) else [configured]:
        if token_id is not None:
            ids.append(token_id)
    return list(dict.fromkeys(ids))


def generate_answers(model, tokenizer, texts: list[str], *, stop_ids: list[int], settings, device,
                     budgets: list[int | None] | None = None) -> list[Answer]:
    """One answer per prompt text: cleaned text, and the raw text with special tokens up to the stop.
    ``budgets``: each prompt's own ``max_new_tokens`` (None: the setting's); prompts of similar budgets are
    batched together and each answer is cut at its own budget, as if generated alone."""
    import torch

    limits = [b or settings.max_new_tokens for b in (budgets or [None] * len(texts))]
    kwargs = {
        "do_sample": settings.do_sample,
        "num_beams": settings.num_beams,
        "eos_token_id": stop_ids,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
        value = getattr(settings, name)
        if value is not None:
            kwargs[name] = value
    if not settings.do_sample:
        # Greedy: unset sampling knobs a checkpoint's generation_config may carry, so transformers stays quiet.
        kwargs.update({"temperature": None, "top_p": None, "top_k": None})
    answers: list[Answer | None] = [None] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: limits[i])
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            encoded = tokenizer([texts[i] for i in batch], add_special_tokens=False, return_tensors="pt",
                                padding=True).to(device)
            with torch.no_grad():
                output = model.generate(**encoded, **kwargs, max_new_tokens=max(limits[i] for i in batch))
            new_tokens = output[:, encoded["input_ids"].shape[1]:]
            for i, row in zip(batch, new_tokens.tolist(), strict=True):
                answers[i] = answer_from_tokens(row[:limits[i]], tokenizer, stop_ids, limits[i])
    finally:
        tokenizer.padding_side = padding_side
        if was_training:
            model.train()
    return answers  # type: ignore[return-value]


def answer_from_tokens(row: list[int], tokenizer, stop_ids: list[int], max_new_tokens: int) -> Answer:
    """The answer that generating ``row`` gives: cut after its first stop token, cleaned as every answer is."""
    cut = None
    for i, token_id in enumerate(row):
        if token_id in stop_ids:
            cut = i + 1
            break
    kept = [t for t in row[:cut] if t != tokenizer.pad_token_id or t in stop_ids]
    raw = tokenizer.decode(kept, skip_special_tokens=False)
    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
    return Answer(text=text, raw=raw, stopped=cut is not None, new_tokens=cut if cut is not None else len(kept),
                  max_new_tokens=max_new_tokens)


@hookimpl(trylast=True)
def sft_spec_generate(item, run, prompts, when) -> list[Answer]:
    settings = item.section(GENERATION)
    if settings.do_sample:  # sampled answers are reproducible too: the spec's seed, whatever ran before
        import torch

        torch.manual_seed(int(item.spec.training.get("seed", 42)))
    tokenizer = run.loaded.tokenizer
    stop_ids = stop_token_ids(tokenizer, run.model, run.markers.end_of_turn if run.markers else None)
    return generate_answers(run.model, tokenizer, [p.text for p in prompts], stop_ids=stop_ids,
                            settings=settings, budgets=[p.max_new_tokens for p in prompts],
                            device=run.model.device if hasattr(run.model, "device") else run.loaded.device)
