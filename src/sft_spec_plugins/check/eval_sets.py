"""Evaluation sets: ``eval:`` names sets of rows, each row an expectation, each set one test case.

    eval:
      golden:
        path: data/golden.jsonl          # JSON Lines, JSON, CSV or Parquet, inside the spec's folder
        prompt: question                 # the column of the prompt: a string, or a chat ([{role, content}])
        reference: answer                # the column of the reference answer
        checks: {equals: "{reference}", chrf: {at_least: 40}}
        pass_rate: {at_least: 0.9}       # share of rows whose checks all hold
        mean: {chrf: {at_least: 50}}     # and median: of a metric over the rows
        retention: {at_least: 0.95}      # of the rows the base model passed, the share still passing
        change: {chrf: {max_drop: 5}}    # the mean's change from the base model: max_drop, min_gain, max_increase

A check's string argument may name a column in braces (``"{reference}"``, ``"{answer_column}"``); a
metric's ``to`` is the row's reference unless given. A set with ``text:`` (a column of held-out text) has
no prompts: its rows are scored by ``perplexity`` or ``likelihood`` alone, a forgetting measure that needs
no probe answers. A set with no threshold at all needs every row to pass (``pass_rate: {at_least: 1}``);
one with only ``mean``, ``retention`` or ``change`` is decided by those. Rows are streamed in chunks (answers
generated in left-padded batches, likelihoods in batched forward passes), so a set of 10,000 rows holds
scores, never logits. The test id names the set: ``spec.sft.yaml::name::eval[golden]``.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator

from sft_spec import hookimpl
from sft_spec.errors import Location, SpecError, did_you_mean
from sft_spec.loading.data import check_conversation
from sft_spec.loading.expectations import MAX_PROMPT_CHARS, plugin_validate
from sft_spec.registry import Check, CheckContext, CheckResult, SpecSection
from sft_spec.spec import XfailSpec, xfail_shorthand
from sft_spec.state import Answer, Expectation, FormattedText, StashKey, TrainingCheck

from ..common import uncertainty as u
from . import metrics as m

CHUNK = 256  # rows formatted, generated and scored together; only their scores are kept


class Threshold(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at_least: float | None = Field(None, allow_inf_nan=False, description="The value must be at least this")
    at_most: float | None = Field(None, allow_inf_nan=False, description="The value must be at most this")
    confidence: float | None = Field(None, gt=0, lt=1, description="Judge on the value's interval at this level "
                                     "(e.g. 0.95) instead of its point: passes when the whole interval holds the "
                                     "bound, fails when none of it does, else inconclusive (a failure that says "
                                     "how many rows would settle it)")

    @model_validator(mode="after")
    def _a_bound(self) -> Threshold:
        if self.at_least is None and self.at_most is None:
            raise ValueError("a threshold needs at_least or at_most (an empty one would pass at any value)")
        return self


class Change(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_drop: float | None = Field(None, allow_inf_nan=False, description="before - after may be at most this")
    min_gain: float | None = Field(None, allow_inf_nan=False, description="after - before must be at least this")
    max_increase: float | None = Field(None, allow_inf_nan=False, description="after - before may be at most this "
                                       "(perplexity)")

    @model_validator(mode="after")
    def _a_bound(self) -> Change:
        if self.max_drop is None and self.min_gain is None and self.max_increase is None:
            raise ValueError("a change needs max_drop, min_gain or max_increase (an empty one would pass at any "
                             "value)")
        return self


class EvalSetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(None, description="A file of rows inside the spec's folder (.jsonl, .json, .csv, "
                             ".parquet)")
    format: Literal["json", "csv", "parquet"] | None = Field(None, description="The file's format; default: "
                                                             "from its suffix")
    rows: list[dict[str, Any]] | None = Field(None, description="Rows written inline, instead of path")
    prompt: str = Field("prompt", description="Column of the prompt: a string (one user turn) or a chat")
    reference: str | None = Field("reference", description="Column of the reference answer (metrics' to:)")
    text: str | None = Field(None, description="Column of held-out text, instead of prompts: perplexity rows")
    id: str | None = Field(None, description="Column that names each row, unique in the set: `sft-spec compare` "
                           "pairs the rows of two runs by it (default: by the row's content)")
    checks: dict[str, Any] = Field(description="Checks and metrics applied to every row")
    limit: int | None = Field(None, gt=0, description="Use the first N rows only")
    pass_rate: Threshold | None = Field(None, description="Share of rows whose checks hold; when the set gives no "
                                        "threshold at all: at_least 1 (every row)")
    mean: dict[str, Threshold] = Field(default_factory=dict, description="Mean of a metric over the rows")
    median: dict[str, Threshold] = Field(default_factory=dict, description="Median of a metric over the rows")
    retention: Threshold | None = Field(None, description="Of the rows the base model passed, the share that "
                                        "still pass after training")
    change: dict[str, Change] = Field(default_factory=dict, description="A metric's mean, after minus before "
                                      "training")
    # str and bool in the type for the JSON Schema: the validator turns them into an XfailSpec.
    xfail: XfailSpec | str | bool | None = Field(None, description="This set is expected to fail: a reason, true, "
                                                 "or {reason, strict}")

    @field_validator("xfail", mode="before")
    @classmethod
    def _xfail_shorthand(cls, value: Any) -> Any:
        return None if value is False else xfail_shorthand(value)


#: An eval set's name is part of test ids (``spec::eval[NAME]``): no brackets or colons that could forge another.
SET_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class EvalSection(RootModel[dict[str, EvalSetSpec]]):
    @field_validator("root")
    @classmethod
    def _names(cls, value: dict[str, EvalSetSpec]) -> dict[str, EvalSetSpec]:
        for name in value:
            if not SET_NAME.match(name):
                raise ValueError(f"eval set name {name!r}: letters, digits, _, . and - only (it is part of test "
                                 "ids, as eval[NAME])")
        return value


EVAL = SpecSection("eval", EvalSection, "Evaluation sets: rows of prompts and references, each set one test case")


@dataclass
class Row:
    index: int
    prompt: list[dict] | None  # None: a held-out text row
    text: str | None
    reference: str | None
    checks: list[tuple[str, Any]]
    location: Location
    key: str = ""  # names the row across runs: its id column, else a hash of its content


@dataclass
class EvalSet:
    """One ``eval`` entry, read and checked at collection: what its test case runs."""

    name: str
    spec: EvalSetSpec
    rows: list[Row]
    digest: str = ""
    metric_names: list[str] = field(default_factory=list)

    def __str__(self) -> str:  # what the result cache hashes: the rows' contents, not the object
        return f"EvalSet({self.name}, {self.digest})"

    @property
    def shown(self) -> dict[str, Any]:
        """What reports show as this case's argument (the rows are in the set's own report)."""
        return {"set": self.name, "rows": len(self.rows), "source": self.spec.path or "inline", "digest": self.digest}

    @property
    def needs_answers(self) -> bool:
        return any(name not in ("likelihood", "perplexity") for name, _ in self.rows[0].checks) if self.rows else False

    @property
    def needs_base(self) -> bool:
        return bool(self.spec.retention or self.spec.change) or any(
            isinstance(arg, dict) and any(k in arg for k in m.BASE_THRESHOLDS) for _, arg in self.rows[0].checks)


@dataclass
class RowResult:
    index: int
    passed: bool
    scores: dict[str, float]
    answer: str | None = None
    stopped: bool | None = None
    failures: list[str] = field(default_factory=list)
    max_new_tokens: int | None = None  # the answer's budget (from its reference when the spec sets none)


#: Each set's rows measured on the base model, before training, by the set's node id.
BASE_RESULTS = StashKey[dict[str, list[RowResult]]]()
#: What the report carries for each set (rows worst first, aggregates), by the set's node id.
SET_REPORTS = StashKey[dict[str, dict[str, Any]]]()


@hookimpl
def sft_spec_register_spec_sections(register) -> None:
    register(EVAL)


def _not_by_hand(value: Any) -> str | None:
    return None if isinstance(value, EvalSet) else "eval sets are written under the spec's eval: key"


@hookimpl
def sft_spec_register_checks(register) -> None:
    register(Check("eval", run_eval_set, "an evaluation set (written under eval:)", _not_by_hand, scope="training"))


# -- collection: rows read, checks resolved, one case per set -------------------------------------------


#: ``{column}`` (a name, so a regex's ``\d{3}`` stays as written); ``{{`` and ``}}`` are literal braces.
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_]\w*)\}")


#: Checks whose argument is a pattern: a row's value fills it in as literal text (a reference ``.*`` matches
#: itself, not anything).
PATTERN_CHECKS = {"regex"}


def _substitute(value: Any, row: dict[str, Any], reference: str | None, literal=None) -> Any:
    """A check's argument with the row's values in its ``{column}`` placeholders; ``literal`` escapes each
    value first (``re.escape`` for a pattern)."""
    if isinstance(value, str):
        def one(mt: re.Match) -> str:
            name = mt.group(1)
            if name is None:
                return mt.group(0)[0]  # {{ -> {, }} -> }
            text = reference if name == "reference" and reference is not None else _text(row.get(name))
            return literal(text) if literal else text

        return _PLACEHOLDER.sub(one, value)
    if isinstance(value, dict):
        return {k: _substitute(v, row, reference, literal) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, row, reference, literal) for v in value]
    return value


def _text(value: Any) -> str:
    """A cell as text: strings as they are, numbers as written (rows.WrittenNumber keeps a JSON number's own
    text); other values are refused before this."""
    if isinstance(value, str):
        return value
    return getattr(value, "text", None) or json.dumps(value, ensure_ascii=False)


def _cell_problem(column: str, value: Any) -> str | None:
    if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
        return None
    what = "empty (null)" if value is None else f"a {type(value).__name__}, not text"
    return f"column {column!r} is {what}: references and placeholders need text"


def _placeholders(value: Any) -> set[str]:
    if isinstance(value, str):
        return {name for name in _PLACEHOLDER.findall(value) if name}
    if isinstance(value, dict):
        return set().union(*map(_placeholders, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(_placeholders, value)) if value else set()
    return set()


def _read(item, name: str, spec: EvalSetSpec) -> list[tuple[dict, Location]]:
    from ..collect.rows import read_rows

    if (spec.path is None) == (spec.rows is None):
        raise SpecError(f"eval set {name!r} needs path (a file of rows) or rows (inline), not "
                        f"{'both' if spec.path else 'neither'}", item.locate("eval", name))
    if spec.rows is not None:
        return [(row, item.locate("eval", name, "rows", i)) for i, row in enumerate(spec.rows)]
    try:
        return read_rows(item.folder, spec.path, spec.format, what="eval file")
    except SpecError as exc:
        raise SpecError(exc.message, exc.location or item.locate("eval", name, "path"), f"eval.{name}.path") from None
    except ValueError as exc:  # the path rule
        raise SpecError(str(exc), item.locate("eval", name, "path"), f"eval.{name}.path") from None


def _prompt(value: Any, column: str, where: Location) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(t, dict) and isinstance(t.get("role"), str)
                                                 and isinstance(t.get("content"), str) for t in value):
        turns = [{"role": t["role"], "content": t["content"]} for t in value]
        problem = check_conversation(turns + [{"role": "assistant", "content": ""}])
        if turns[-1]["role"] != "user" or problem:
            raise SpecError(f"column {column!r}: a chat prompt must end with the user turn to answer", where)
        return turns
    shown = repr(value)[:200]
    raise SpecError(f"column {column!r}: expected a string or a chat (a list of {{role, content}}), got {shown}", where)


def build_set(item, config, name: str, spec: EvalSetSpec) -> EvalSet:
    from ..common.recorded import sha256

    where = item.locate("eval", name)
    registry = config.registry.checks
    set_checks = {c.name: c for c in m.checks(needs_reference=False)}
    validators = {}
    for key, argument in spec.checks.items():
        check = registry.get(key)
        if check is None or check.scope != "answer":
            answer_checks = [n for n, c in registry.items() if c.scope == "answer"]
            raise SpecError(did_you_mean(key, answer_checks, "check"), item.locate("eval", name, "checks", key),
                            f"eval.{name}.checks.{key}")
        if spec.text is not None and key not in ("likelihood", "perplexity"):
            raise SpecError(f"eval set {name!r} has text rows (no prompts, no answers): only perplexity and "
                            f"likelihood apply, not {key}", item.locate("eval", name, "checks", key))
        validate = validators[key] = (set_checks.get(key) or check).validate
        # With {column} placeholders the argument is validated row by row, once filled in (below).
        problem = None if _placeholders(argument) else plugin_validate(validate, argument, f"check {key!r}")
        if problem:
            raise SpecError(problem, item.locate("eval", name, "checks", key), f"eval.{name}.checks.{key}")
    metric_names = [k for k in spec.checks if k in m.METRICS]
    for kind, table in (("mean", spec.mean), ("median", spec.median), ("change", spec.change)):
        for metric in table:
            if metric not in metric_names:
                raise SpecError(f"{kind}.{metric}: {metric} is not among this set's checks "
                                f"({', '.join(metric_names) or 'no metrics'})", item.locate("eval", name, kind, metric))
    raw = _read(item, name, spec)[: spec.limit]
    if not raw:
        raise SpecError(f"eval set {name!r} has no rows", where)
    rows: list[Row] = []
    filled = {key for key, argument in spec.checks.items() if _placeholders(argument)}  # validated row by row
    keys: dict[str, Location] = {}
    copies: Counter[str] = Counter()
    named = _placeholders(spec.checks)
    # The reference column is read when a check uses it: {reference}, or a metric without its own to:.
    wants_reference = "reference" in named or (spec.text is None and any(
        k in m.METRICS and isinstance(a, dict) and "to" not in a for k, a in spec.checks.items()))
    if wants_reference and not spec.reference:
        raise SpecError(f"the checks of eval set {name!r} use the reference, and the set names no reference column",
                        item.locate("eval", name, "checks"))
    reference_column = spec.reference if wants_reference else None
    for i, (values, row_where) in enumerate(raw):
        unknown = sorted(named - {"reference"} - set(values))
        if unknown:  # a typo in the spec's checks: said there, with the columns the row has
            raise SpecError(f"checks name column(s) {', '.join(unknown)} in braces; {row_where} has columns "
                            f"{', '.join(values)} (write {{{{ and }}}} for literal braces)",
                            item.locate("eval", name, "checks"))
        columns = [spec.text] if spec.text else [spec.prompt]
        for column in [*columns, *([reference_column] if reference_column else []), *(named - {"reference"})]:
            if column not in values:
                raise SpecError(did_you_mean(column, list(values), "column").replace("unknown column", "no column"),
                                row_where)
            if column != spec.prompt and (problem := _cell_problem(column, values[column])):
                raise SpecError(problem, row_where)
        reference = _text(values[reference_column]) if reference_column else None
        row_checks = []
        for key, written in spec.checks.items():
            argument = _substitute(written, values, reference, re.escape if key in PATTERN_CHECKS else None)
            # A row's own values are validated as the spec's are (a schema's $ref, a pattern), located at the row.
            if key in filled and (problem := plugin_validate(validators[key], argument, f"check {key!r}")):
                raise SpecError(f"checks.{key} with this row's values: {problem}", row_where)
            if key in m.METRICS and "to" not in argument:
                argument = {**argument, "to": _text(values[spec.text]) if spec.text else reference}
            row_checks.append((key, argument))
        prompt = None if spec.text else _prompt(values[spec.prompt], spec.prompt, row_where)
        if prompt and sum(len(t["content"]) for t in prompt) > MAX_PROMPT_CHARS:
            raise SpecError(f"the prompt has {sum(len(t['content']) for t in prompt)} characters; a prompt may have "
                            f"{MAX_PROMPT_CHARS}", row_where)
        text = _text(values[spec.text]) if spec.text else None
        if spec.id is not None:
            if spec.id not in values:
                raise SpecError(did_you_mean(spec.id, list(values), "column").replace("unknown", "no") +
                                " (the set's id:)", row_where)
            if problem := _cell_problem(spec.id, values[spec.id]):
                raise SpecError(f"id: {problem}", row_where)
            key = _text(values[spec.id])
            if key in keys:
                raise SpecError(f"id column {spec.id!r}: {key!r} names two rows ({keys[key]} and this one)", row_where)
        else:  # the row's content; the second copy of a row written twice is told apart by its count
            content = sha256([prompt, text, reference])[:16]
            key = content if not copies[content] else f"{content}#{copies[content]}"
            copies[content] += 1
        keys[key] = row_where
        rows.append(Row(i, prompt, text, reference, row_checks, row_where, key))
    digest = sha256([[r.prompt, r.text, r.checks] for r in rows])[:16]
    _note_surprises(item, name, spec, raw[0][0], rows)
    return EvalSet(name, spec, rows, digest, metric_names)


def _note_surprises(item, name: str, spec: EvalSetSpec, first_row: dict, rows: list[Row]) -> None:
    """What a spec probably did not mean, said in every report: a check compared with the literal name of a
    column (``equals: reference``), and prompts the model was trained on (the set then measures memory)."""
    columns = {*first_row, "reference"}
    for key, argument in spec.checks.items():
        if isinstance(argument, str) and argument in columns and not _placeholders(argument):
            item.notes.append(f"{item.locate('eval', name, 'checks', key)}: note: eval set {name!r}: {key} "
                              f"{argument!r} is compared as that literal word; did you mean \"{{{argument}}}\" "
                              f"(each row's {argument})?")
    trained = {json.dumps(turn["content"], ensure_ascii=False) for conversation in item.conversations
               for turn in conversation if isinstance(turn, dict) and turn.get("role") == "user"}
    seen = [r for r in rows if r.prompt and json.dumps(r.prompt[-1]["content"], ensure_ascii=False) in trained]
    if seen:
        item.notes.append(f"{item.locate('eval', name)}: note: eval set {name!r}: {len(seen)} of {len(rows)} "
                          f"prompts are also in the training data (first: {seen[0].location}): the set measures "
                          "what was memorised, not what generalises")


@hookimpl
def sft_spec_resolve_spec(item, config) -> list[SpecError]:
    """Each set's rows read, and the set added as a test case (``eval[name]``)."""
    section = item.section(EVAL)
    if section is None:
        return []
    errors = []
    for name, spec in section.root.items():
        try:
            evalset = build_set(item, config, name, spec)
        except SpecError as exc:
            errors.append(exc)
            continue
        item.training_checks.append(TrainingCheck("eval", evalset, f"{item.nodeid}::eval[{name}]",
                                                  item.locate("eval", name), xfail=spec.xfail))
    return errors


# -- running a set: on the base model before training, on the trained model as its check -------------------


def _contexts(item, run, evalset: EvalSet, rows: list[Row]) -> list[CheckContext]:
    hook, out = run.config.hook, []
    for row in rows:
        try:
            prompt = (FormattedText(text="") if row.prompt is None else
                      hook.sft_spec_format(item=item, run=run, messages=row.prompt, add_generation_prompt=True))
        except SpecError as exc:  # this row's prompt: said where the row was written
            raise SpecError(f"eval set {evalset.name!r}, row {row.index}: {exc.message}", row.location) from None
        case = Expectation(row.index, f"{item.nodeid}::eval[{evalset.name}][{row.index}]", row.prompt or [],
                           row.checks, [], row.location)
        out.append(CheckContext(item=item, run=run, case=case, prompt=prompt, losses=run.losses))
    return out


def _with_budgets(item, run, rows: list[Row], contexts: list[CheckContext]) -> None:
    for row, ctx in zip(rows, contexts, strict=True):
        try:
            ctx.prompt.max_new_tokens = run.config.hook.sft_spec_answer_budget(item=item, run=run, checks=row.checks)
        except SpecError as exc:
            raise SpecError(f"eval set row {row.index}: {exc.message}", row.location) from None


def measure(item, run, evalset: EvalSet, when: Literal["before", "after"]) -> list[RowResult]:
    """Every row's checks on the model as it is now, chunk by chunk. Before training, thresholds that
    compare with the base model are left out (they are what this measures)."""
    registry = run.config.registry.checks
    results: list[RowResult] = []
    for start in range(0, len(evalset.rows), CHUNK):
        rows = evalset.rows[start:start + CHUNK]
        contexts = _contexts(item, run, evalset, rows)
        answers: list[Answer | None] = [None] * len(rows)
        if evalset.needs_answers:
            _with_budgets(item, run, rows, contexts)
            answers = run.config.hook.sft_spec_generate(item=item, run=run, prompts=[c.prompt for c in contexts],
                                                        when=when)
        for ctx, answer in zip(contexts, answers, strict=True):
            ctx.answer = answer
        per_row: list[list[tuple[str, CheckResult]]] = [[] for _ in rows]
        for position, (name, _) in enumerate(rows[0].checks):
            check = registry[name]
            triples = []
            for row, ctx, answer in zip(rows, contexts, answers, strict=True):
                argument = row.checks[position][1]
                if when == "before" and isinstance(argument, dict):
                    argument = {k: v for k, v in argument.items() if k not in m.BASE_THRESHOLDS}
                triples.append((answer.text if answer else "", argument, ctx))
            outcomes = check.batch(triples) if check.batch else [check.func(*t) for t in triples]
            for i, outcome in enumerate(outcomes):
                per_row[i].append((name, outcome))
        if when == "before":  # likelihood and perplexity on the base model: the rows' own gain and max_increase
            store = run.stash.setdefault(m.BASE_SCORES, {})
            for row, ctx, outcomes in zip(rows, contexts, per_row, strict=True):
                for (name, argument), (_, outcome) in zip(row.checks, outcomes, strict=True):
                    if name in ("likelihood", "perplexity") and outcome.score is not None:
                        store[(name, *m.continuation(ctx, argument.get("to", "")))] = outcome.score
        for row, answer, outcomes in zip(rows, answers, per_row, strict=True):
            cut = f" (generation stopped at max_new_tokens={answer.max_new_tokens} before the end of turn)" \
                if answer is not None and not answer.stopped else ""
            results.append(RowResult(
                index=row.index, passed=all(o.passed for _, o in outcomes),
                scores={n: o.score for n, o in outcomes if o.score is not None and n in m.METRICS},
                answer=answer.text if answer else None, stopped=answer.stopped if answer else None,
                failures=[f"{n}: {o.message}" + (cut if n != "stops" else "") for n, o in outcomes if not o.passed],
                max_new_tokens=answer.max_new_tokens if answer else None))
    return results


@hookimpl
def sft_spec_evaluate(item, run) -> None:
    """Sets that compare with the base model measure it now, before training."""
    base = run.stash.setdefault(BASE_RESULTS, {})
    for case in item.selected_training_checks:
        if case.name != "eval" or not case.argument.needs_base:
            continue
        base[case.nodeid] = measure(item, run, case.argument, "before")


def _seed(item) -> Any:
    """The seed this run trained with (TrainingArguments' default when the spec sets none)."""
    return item.spec.training.get("seed", 42)


#: How each aggregate's uncertainty is estimated, from the rows' values (a rows x seeds matrix).
ESTIMATORS = {"pass_rate": u.proportion, "retention": u.proportion, "mean": u.mean, "median": u.median,
              "change": lambda values, level=u.LEVEL: u.mean(values, level, binary_as_share=False)}


def rows_needed(estimate: u.Estimate, bound: float, level: float, proportion: bool) -> int | None:
    """Rows at which the interval at ``level`` would clear ``bound`` (on either side), if the value and its
    spread held: Wilson's interval for a share of rows, Student's t (as a normal) for a mean."""
    from scipy import stats

    value, rows = estimate.value, estimate.rows
    if not rows or value == bound or not math.isfinite(value):
        return None
    z = float(stats.norm.ppf(0.5 + level / 2))
    spread = estimate.stderr * math.sqrt(rows) if estimate.stderr is not None else None
    n = float(rows)
    while n < 10_000_000:
        n *= 1.1
        if proportion:
            centre = (value + z * z / (2 * n)) / (1 + z * z / n)
            half = z / (1 + z * z / n) * math.sqrt(value * (1 - value) / n + z * z / (4 * n * n))
        elif spread:
            centre, half = value, z * spread / math.sqrt(n)
        else:
            return None
        if centre - half > bound or centre + half < bound:
            return math.ceil(n)
    return None


class _Judge:
    """The set's thresholds applied to its aggregates, each shown with its interval; a threshold with
    ``confidence`` is judged on the interval at that level (passed, failed, or inconclusive)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.failed = self.inconclusive = False
        self.estimates: dict[str, u.Estimate] = {}

    def __call__(self, name: str, label: str, values: Any, limit: Threshold | None) -> float:
        how = name.split("_")[0] if name.split("_")[0] in ESTIMATORS else name
        estimate = ESTIMATORS[how](values)
        self.estimates[name] = estimate
        text = f"{label} {estimate.text()}"
        if limit is None:
            self.parts.append(text)
            return estimate.value
        value = estimate.value
        if limit.confidence is None:
            for bound, holds, sign in ((limit.at_least, value >= (limit.at_least or 0), ">="),
                                       (limit.at_most, value <= (limit.at_most or 0), "<=")):
                if bound is not None:
                    self.failed |= not holds
                    text += f" {sign if holds else {'>=': '<', '<=': '>'}[sign]} {bound:g}"
            self.parts.append(text)
            return value
        at = ESTIMATORS[how](values, level=limit.confidence)
        shown = f"{round(limit.confidence * 100):g}% interval {at.low:.3g} to {at.high:.3g}" \
            if at.low is not None else "no interval"
        low, high = at.low, at.high
        for bound, word, sure, never in (
                (limit.at_least, "at least", low is not None and low >= (limit.at_least or 0),
                 high is not None and high < (limit.at_least or 0)),
                (limit.at_most, "at most", high is not None and high <= (limit.at_most or 0),
                 low is not None and low > (limit.at_most or 0))):
            if bound is None:
                continue
            if sure:
                text += f"; the {shown} holds {word} {bound:g}"
            elif never:
                self.failed = True
                text += f"; the {shown} misses {word} {bound:g}"
            else:
                self.inconclusive = True
                needed = rows_needed(estimate, bound, limit.confidence, how in ("pass_rate", "retention"))
                text += (f"; inconclusive: the {shown} straddles {word} {bound:g}"
                         + (f" (about {needed} rows would settle it)" if needed else ""))
        self.parts.append(text)
        return value


def run_eval_set(_: str, evalset: EvalSet, ctx: CheckContext) -> CheckResult:
    item, run = ctx.item, ctx.run
    after = measure(item, run, evalset, "after")
    before = run.stash.get(BASE_RESULTS, {}).get(ctx.case.nodeid)
    spec = evalset.spec
    judge = _Judge()
    default = spec.pass_rate is None and not (spec.mean or spec.median or spec.retention or spec.change)
    aggregates: dict[str, float] = {"pass_rate": judge("pass_rate", "pass_rate", [float(r.passed) for r in after],
                                                      spec.pass_rate or (Threshold(at_least=1.0) if default else None))}
    for how, table in (("mean", spec.mean), ("median", spec.median)):
        for metric, limit in table.items():
            values = [r.scores.get(metric, math.nan) for r in after]
            aggregates[f"{how}_{metric}"] = judge(f"{how}_{metric}", f"{how} {metric}", values, limit)
    if spec.retention is not None:
        if before is None:
            judge.failed = True
            judge.parts.append("retention: the base model was not measured")
            aggregates["retention"] = math.nan
        elif not any(b.passed for b in before):
            judge.parts.append("retention: no row passed on the base model, nothing to retain")
            aggregates["retention"] = 1.0
        else:
            kept = [float(a.passed) for a, b in zip(after, before, strict=False) if b.passed]
            aggregates["retention"] = judge("retention", f"retention ({int(sum(kept))}/{len(kept)})", kept,
                                            spec.retention)
    for metric, change in spec.change.items():
        paired = [(b.scores[metric], a.scores[metric]) for a, b in zip(after, before or [], strict=False)
                  if metric in a.scores and metric in b.scores]
        if not paired:
            judge.failed = True
            judge.parts.append(f"change of {metric}: no base-model scores")
            continue
        delta = judge(f"change_{metric}", f"change of mean {metric}", [a - b for b, a in paired], None)
        aggregates[f"change_{metric}"] = delta
        then = statistics.fmean(b for b, _ in paired)
        text = f" ({then:.4g} -> {then + delta:.4g})"
        for key, bad in (("max_drop", -delta > (change.max_drop or 0)), ("min_gain", delta < (change.min_gain or 0)),
                         ("max_increase", delta > (change.max_increase or 0))):
            limit = getattr(change, key)
            if limit is not None:
                judge.failed |= bad
                text += f", {key} {limit:g}{' exceeded' if bad and key != 'min_gain' else ' missed' if bad else ''}"
        judge.parts[-1] += text
    ok = not judge.failed and not judge.inconclusive
    message = "; ".join(judge.parts) + f" ({len(after)} rows, seed {_seed(item)})"
    run.note(f"eval[{evalset.name}]: {message}")
    report = _set_report(evalset, after, before, aggregates)
    report["uncertainty"] = {name: e.to_dict() for name, e in judge.estimates.items()}
    report["seeds"] = [_seed(item)]
    report["outcome"] = "failed" if judge.failed else "inconclusive" if judge.inconclusive else "passed"
    if report["outcome"] == "inconclusive":
        report["verdict"] = "inconclusive"
    run.stash.setdefault(SET_REPORTS, {})[ctx.case.nodeid] = report
    worst = next((r for r in _worst_first(evalset, after) if not r.passed), None)
    if not ok and worst is not None:
        message += f"; worst row {worst.index} ({evalset.rows[worst.index].location}): {'; '.join(worst.failures)}"
    return CheckResult(ok, message, score=aggregates["pass_rate"])


def _worst_first(evalset: EvalSet, results: list[RowResult]) -> list[RowResult]:
    primary = evalset.metric_names[0] if evalset.metric_names else None
    sign = 1 if primary is None or m.METRICS[primary].higher_is_better else -1

    def key(r: RowResult):
        score = r.scores.get(primary) if primary else None
        return (r.passed, sign * score if score is not None else 0.0, r.index)

    return sorted(results, key=key)


def _set_report(evalset: EvalSet, after: list[RowResult], before: list[RowResult] | None,
                aggregates: dict[str, float]) -> dict[str, Any]:
    by_index = {r.index: r for r in before or []}
    rows = []
    for result in _worst_first(evalset, after):
        row = evalset.rows[result.index]
        base = by_index.get(result.index)
        rows.append({
            "index": row.index, "key": row.key, "location": str(row.location),
            "prompt": row.prompt[-1]["content"] if row.prompt else None, "text": row.text,
            "reference": row.reference, "answer": result.answer, "stopped": result.stopped, "passed": result.passed,
            "max_new_tokens": result.max_new_tokens,
            "scores": result.scores, "failures": result.failures,
            "base": None if base is None else {"answer": base.answer, "passed": base.passed, "scores": base.scores},
        })
    return {"name": evalset.name, "metrics": evalset.metric_names, "aggregates": aggregates, "rows": rows}


@hookimpl(wrapper=True)
def sft_spec_make_report(item, run, report):
    report = yield
    sets = run.stash.get(SET_REPORTS, None)
    if report is not None and sets:
        report.eval_sets = sets
    return report


def combine_seed_reports(runs: list[tuple[Any, dict[str, Any]]]) -> dict[str, Any]:
    """One set's reports from several seeds (``repeat:``) as one: the first seed's rows, each with its
    values on every seed (``by_seed``), and every aggregate pooled over rows and seeds with an interval
    clustered by row and by seed."""
    import copy

    first = copy.deepcopy(runs[0][1])
    seeds = [seed for seed, _ in runs]
    by_key = [{row.get("key", row["index"]): row for row in data.get("rows", [])} for _, data in runs]
    rows = [row for row in first.get("rows", []) if all(row.get("key", row["index"]) in rows_of
                                                        for rows_of in by_key)]
    for row in rows:
        key = row.get("key", row["index"])
        row["by_seed"] = {str(seed): {"passed": rows_of[key]["passed"], "scores": rows_of[key].get("scores", {}),
                                      "answer": rows_of[key].get("answer")}
                          for seed, rows_of in zip(seeds, by_key, strict=True)}

    def matrix(value) -> list[list[float]]:
        return [[value(row, row["by_seed"][str(seed)]) for seed in seeds] for row in rows]

    aggregates, uncertainty = {}, {}
    for name in first.get("aggregates", {}):
        how, _, metric = name.partition("_")
        if name == "pass_rate":
            values = matrix(lambda row, at: float(at["passed"]))
        elif name == "retention":
            values = [v for row, v in zip(rows, matrix(lambda row, at: float(at["passed"])), strict=True)
                      if row.get("base") and row["base"].get("passed")]
        elif how == "change":
            values = matrix(lambda row, at, metric=metric: at["scores"].get(metric, math.nan) - (
                (row.get("base") or {}).get("scores", {}).get(metric, math.nan)))
        else:
            values = matrix(lambda row, at, metric=metric: at["scores"].get(metric, math.nan))
        if not values:
            aggregates[name] = first["aggregates"][name]
            continue
        estimate = ESTIMATORS[how if how in ESTIMATORS else name](values)
        aggregates[name], uncertainty[name] = estimate.value, estimate.to_dict()
    first.update(aggregates=aggregates, uncertainty=uncertainty, seeds=seeds)
    outcomes = [data.get("outcome") for _, data in runs]
    first.pop("verdict", None)  # the first seed's: decided again over every seed
    if "inconclusive" in outcomes and "failed" not in outcomes:
        first["verdict"] = "inconclusive"
    return first
