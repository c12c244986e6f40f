"""Collators: which tokens carry the loss.

The mask is computed on characters and mapped to tokens through the tokenizer's offsets, so it does
not depend on how a tokenizer happens to split the response template in context (the classic failure
of the removed ``DataCollatorForCompletionOnlyLM``). The mask phase then truncates to ``max_length``
(``truncation_mode: keep_start`` or ``keep_end``); a text far longer than that is cut at a character
bound first, so a 50 MB line is never tokenized whole.

- ``completion_only``: loss after the ``response_template`` before the last answer (with
  ``instruction_template``: before every answer), as ``DataCollatorForCompletionOnlyLM`` did; the template
  is looked for in the prompt before each answer only (the formatter says where answers lie), so an
  answer that quotes the template is trained whole, with a warning.
- ``assistant_only``: every assistant turn of a multi-turn chat, end-of-turn marker included.
- ``full``: every token.
"""

from __future__ import annotations

from pathlib import Path

from sft_spec import hookimpl
from sft_spec.errors import SpecError, did_you_mean
from sft_spec.loading.expectations import plugin_validate
from sft_spec.state import FormattedText, MaskedExample, StashKey

from .formatters import FORMAT

IGNORE_INDEX = -100
#: Collators removed from TRL, mapped to the sft-spec collator that re-creates them.
RENAMED_COLLATORS = {"DataCollatorForCompletionOnlyLM": "completion_only"}


def tokenize_with_offsets(text: str, tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets; special tokens in the text (the template's own) stay special."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def mask_from_spans(formatted: FormattedText, tokenizer, spans: list[tuple[int, int]]) -> MaskedExample:
    """Train every token that overlaps one of the character spans; warn of a token across a span's start."""
    ids, offsets = tokenize_with_offsets(formatted.text, tokenizer)
    labels, notes = [], []
    for token_id, (start, end) in zip(ids, offsets, strict=True):
        inside = any(start < s_end and max(end, start + 1) > s_start for s_start, s_end in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
        straddles = [s for s, _ in spans if start < s < end]
        if straddles and not notes:  # TRL warns of the same: the prompt's end is trained with the answer
            notes.append(f"warning: the token {formatted.text[start:end]!r} spans the end of the prompt and the "
                         "start of the answer: its prompt part carries the loss too")
    return MaskedExample(input_ids=ids, labels=labels, formatted=formatted, offsets=offsets, notes=notes)


class CompletionOnlyCollator:
    """Loss only after the response template: what ``DataCollatorForCompletionOnlyLM`` did, on characters."""

    def spans(self, formatted: FormattedText, fmt, *, markers, notes: list[str]) -> list[tuple[int, int]]:
        response_template = fmt.response_template or markers.response_template
        if not response_template:
            raise SpecError("cannot derive the response template from the chat template: set format.response_template")
        instruction_template, text, answers = fmt.instruction_template, formatted.text, formatted.assistant_spans
        if not answers:  # a formatter that does not say where answers lie: search the whole text, as TRL did
            answers = [(len(text), len(text))]
            regions = [(0, len(text))]
        else:  # the prompt before each answer: from the previous answer's end to this answer's start
            regions = [(answers[k - 1][1] if k else 0, start) for k, (start, _) in enumerate(answers)]
        chosen = range(len(answers)) if instruction_template else [len(answers) - 1]
        out = []
        for k in chosen:
            found = text.rfind(response_template, *regions[k])
            if found < 0:
                shown = text if len(text) < 300 else text[:300] + "..."
                raise SpecError(
                    f"response_template {response_template!r} does not occur in the formatted text {shown!r}: "
                    "nothing would be trained (set format.response_template to the text before each answer)")
            out.append((found + len(response_template), max(answers[k][1], found + len(response_template))))
        if not instruction_template:
            out = [(out[0][0], len(text))]
        quoted = [k for k, (start, end) in enumerate(formatted.assistant_spans) if response_template in text[start:end]]
        if quoted:
            notes.append(f"warning: answer {quoted[0]} quotes the response_template {response_template!r}: the loss "
                         "starts at the template before the answer, not at the quote")
        return out


class AssistantOnlyCollator:
    """Loss on every assistant turn (multi-turn chats), as located by the formatter."""

    def spans(self, formatted, fmt, *, markers, notes) -> list[tuple[int, int]]:
        return list(formatted.assistant_spans)


class FullCollator:
    """Loss on every token, prompt included (plain language modelling)."""

    def spans(self, formatted, fmt, *, markers, notes) -> list[tuple[int, int]]:
        return [(0, len(formatted.text))]


@hookimpl(trylast=True)
def sft_spec_register_collators(register) -> None:
    register("completion_only", CompletionOnlyCollator(),
             "loss after the response_template before the last answer (DataCollatorForCompletionOnlyLM's behaviour)")
    register("assistant_only", AssistantOnlyCollator(), "loss on every assistant turn of a multi-turn chat")
    register("full", FullCollator(), "loss on every token")


#: SFTConfig's loss-mask flags, and the collator each asks for.
LOSS_FLAGS = {"completion_only_loss": {True: "completion_only", False: "full"},
              "assistant_only_loss": {True: "assistant_only"}}


@hookimpl
def sft_spec_resolve_spec(item, config) -> list[SpecError]:
    """format.collator as the recipe means it: old TRL collator names, and SFTConfig's loss-mask flags
    (``completion_only_loss``, ``assistant_only_loss``), read as today's collator, with a note."""
    fmt, where, errors = item.section(FORMAT), item.locate("format", "collator"), []
    if fmt is None:
        return errors
    if fmt.collator in RENAMED_COLLATORS:
        old, fmt.collator = fmt.collator, RENAMED_COLLATORS[fmt.collator]
        item.notes.append(f"{where}: note: {old} was removed from TRL; sft-spec's {fmt.collator!r} collator does "
                          "what it did")
    written = (item.doc.data.get("format") or {}).get("collator") if isinstance(item.doc.data.get("format"), dict) \
        else None
    training = item.spec.training
    asked = {LOSS_FLAGS[k][training[k]] for k in LOSS_FLAGS
             if k in training and isinstance(training[k], bool) and training[k] in LOSS_FLAGS[k]}
    if len(asked) > 1:  # assistant_only_loss and completion_only_loss asking for two collators
        keys = [k for k in LOSS_FLAGS if k in training]
        said = " and ".join(f"{k}: {training[k]}" for k in keys)
        return errors + [SpecError(f"{said} ask for different collators ({', '.join(sorted(asked))}): keep one",
                                   item.locate("training", keys[-1]), key=f"training.{keys[-1]}")]
    for key, collators in LOSS_FLAGS.items():
        if key not in training or not isinstance(training[key], bool) or training[key] not in collators:
            continue
        wanted = collators[training[key]]
        at = item.locate("training", key)
        if written is not None and RENAMED_COLLATORS.get(written, written) != wanted:
            errors.append(SpecError(f"{key}: {training[key]} asks for the collator {wanted!r}, and format.collator "
                                    f"is {written!r}: keep one", at, key=f"training.{key}"))
            continue
        fmt.collator = wanted
        item.notes.append(f"{at}: note: training.{key}: {training[key]} is read as format.collator: {wanted}")
    return errors


@hookimpl
def sft_spec_validate_spec(item, config) -> list[SpecError]:
    """The collator exists and accepts ``format:``."""
    fmt, table, where = item.section(FORMAT), config.registry.collators, item.locate("format", "collator")
    if fmt.collator not in table:
        return [SpecError(did_you_mean(fmt.collator, list(table), "collator"), where, key="format.collator")]
    if fmt.collator != "completion_only":  # read by completion_only alone: say so rather than drop it silently
        for key in ("response_template", "instruction_template"):
            if getattr(fmt, key, None):
                item.notes.append(f"{item.locate('format', key)}: note: format.{key} is used by the completion_only "
                                  f"collator only; collator {fmt.collator!r} does not read it")
    problem = plugin_validate(getattr(table[fmt.collator].obj, "validate", None), fmt, f"collator {fmt.collator!r}")
    return [SpecError(problem, where, key="format.collator")] if problem else []


#: The longest token of a tokenizer, in characters (an upper bound, from its vocabulary's strings).
LONGEST_TOKEN = StashKey[int]()


def _clip(spans: list[tuple[int, int]], offset: int, bound: int) -> list[tuple[int, int]]:
    clipped = [(max(s - offset, 0), min(e - offset, bound)) for s, e in spans]
    return [(s, e) for s, e in clipped if s < e]


def _cut(formatted: FormattedText, spans, keep_end: bool, bound: int) -> tuple[FormattedText, list | None]:
    """The text cut to ``bound`` characters (its start, or its end), spans moved and clipped with it."""
    offset = len(formatted.text) - bound if keep_end else 0
    cut = FormattedText(text=formatted.text[offset:offset + bound], prompt_end=max(formatted.prompt_end - offset, 0),
                        assistant_spans=_clip(formatted.assistant_spans, offset, bound))
    return cut, (None if spans is None else _clip(spans, offset, bound))


@hookimpl(trylast=True)
def sft_spec_make_mask(item, run, formatted, index) -> MaskedExample:
    """The collator's character spans on the whole text (so ``keep_end`` still finds the response template),
    the text cut to what ``max_length`` tokens can span, then tokenized once and truncated to ``max_length``.
    A collator with ``mask(formatted, tokenizer, fmt, *, markers)`` instead of ``spans`` gets the cut text."""
    fmt = item.section(FORMAT)
    collator = run.config.registry.collators[fmt.collator].obj
    markers, tokenizer = run.markers, run.loaded.tokenizer
    max_length = item.spec.training.get("max_length", 1024)
    keep_end = item.spec.training.get("truncation_mode", "keep_start") == "keep_end"
    notes: list[str] = []
    try:
        spans = collator.spans(formatted, fmt, markers=markers, notes=notes) if hasattr(collator, "spans") else None
        if max_length:
            # Tokens of max_length tokens span at most this many characters: a longer text is cut before it
            # is tokenized, so memory stays bounded whatever a data line holds.
            longest = run.loaded.stash.get(LONGEST_TOKEN, None)
            if longest is None:
                longest = run.loaded.stash[LONGEST_TOKEN] = max(map(len, tokenizer.get_vocab()), default=1)
            bound = max_length * longest + 64
            if len(formatted.text) > bound:
                run.note(f"conversation {index} has {len(formatted.text)} characters; cut to {bound} before "
                         f"tokenizing ({'keep_end' if keep_end else 'keep_start'}, max_length={max_length})")
                formatted, spans = _cut(formatted, spans, keep_end, bound)
        example = (mask_from_spans(formatted, tokenizer, spans) if spans is not None
                   else collator.mask(formatted, tokenizer, fmt, markers=markers))
    except SpecError as exc:  # said of this conversation, where it was written (its line in a data file)
        raise item.conversation_error(index, exc) from None
    for note in notes + example.notes:
        run.note(f"conversation {index}: {note}")
    if max_length and len(example.input_ids) > max_length:
        run.note(f"a training conversation has {len(example.input_ids)} tokens; truncated to max_length={max_length}"
                 + (" (keep_end: its end is kept)" if keep_end else ""))
        kept = slice(-max_length, None) if keep_end else slice(None, max_length)
        example.input_ids, example.labels, example.offsets = (example.input_ids[kept], example.labels[kept],
                                                              example.offsets[kept])
    if all(label == IGNORE_INDEX for label in example.labels):
        where = item.sources[index] if index < len(item.sources) else None  # its line in a data file
        raise SpecError(f"the loss mask of collator {fmt.collator!r} trains no token of conversation {index}: "
                        f"{formatted.text[:200]!r}", where)
    eot = markers.end_of_turn if markers else None
    plain = index < len(item.conversations) and getattr(item.conversations[index], "plain_text", None) is not None
    if eot and not plain:  # a plain text (TRL's language-modelling layout) has no turns to end
        trained_text = "".join(
            formatted.text[s:e] for (s, e), lab in zip(example.offsets, example.labels, strict=False)
            if lab != IGNORE_INDEX
        )
        if eot not in trained_text:
            run.note(f"warning: the loss mask leaves out the end-of-turn token {eot!r}: "
                     "the model would never learn to stop")
    return example


# -- large data: the mask phase as one batched datasets.map, cached by fingerprint ------------------------

#: Above this many training conversations the masks are made inside ``datasets.map`` (Arrow on disk, cached
#: by fingerprint) instead of a list in memory: 100,000 conversations cost disk, not RAM, and a second run
#: with the same data, tokenizer and settings reads them back.
BULK_CONVERSATIONS = 2000


@hookimpl(trylast=True)
def sft_spec_make_examples(item, run):
    """Per conversation through the format and mask hooks; large data in batches (see bulk_wanted)."""
    if bulk_wanted(item, run):
        return bulk_examples(item, run)
    hook = run.config.hook
    examples = []
    for index, conversation in enumerate(item.conversations):
        if index < len(run.formatted):
            formatted = run.formatted[index]
        else:
            try:
                formatted = hook.sft_spec_format(item=item, run=run, messages=conversation,
                                                 add_generation_prompt=False)
            except SpecError as exc:  # the user's template or data: say which conversation, where
                raise _about_conversation(item, index, exc) from None
            run.formatted.append(formatted)
        examples.append(hook.sft_spec_make_mask(item=item, run=run, formatted=formatted, index=index))
    return examples


def _about_conversation(item, index: int, exc: SpecError) -> SpecError:
    error = item.conversation_error(index, exc, fallback=item.locate("format"))
    error.phase = "format"  # the format phase's error, made while masking
    return error


def bulk_wanted(item, run) -> bool:
    """Large data, and only the built-in format and mask hooks answer (a plugin's own are called per
    conversation, as always)."""
    if len(item.conversations) <= BULK_CONVERSATIONS:
        return False
    hook = run.config.pluginmanager.hook
    owners = {impl.plugin_name for name in ("sft_spec_make_mask", "sft_spec_format")
              for impl in getattr(hook, name).get_hookimpls() if not (impl.wrapper or impl.hookwrapper)}
    return owners <= {"collators", "formatters"}


def _bulk_key(item, run) -> str:
    from ..common.recorded import code_hash, sha256

    tokenizer = run.loaded.tokenizer
    return sha256([sha256(item.conversations), item.chat_template, item.section(FORMAT).model_dump(),
                   {k: item.spec.training.get(k) for k in ("max_length", "truncation_mode")},
                   getattr(tokenizer, "name_or_path", ""), sha256(sorted(tokenizer.get_vocab().items())),
                   tokenizer.eos_token, run.loaded.source, code_hash()])[:32]


def bulk_examples(item, run):
    """Every training example as a ``datasets.Dataset`` with ``input_ids``, ``labels`` and ``trained`` (the
    number of loss-carrying tokens), made by the same format and mask hooks as small data, in batches."""
    import json
    import re

    import datasets

    from ..common.files import atomic_write_text

    hook = run.config.hook
    folder = Path(run.config.cache_dir) / "masks"
    folder.mkdir(parents=True, exist_ok=True)
    key = _bulk_key(item, run)
    cache, sidecar = folder / f"{key}.arrow", folder / f"{key}.notes.json"
    notes: dict[str, list] = {}

    def counted(message: str) -> None:  # one note per kind of warning, with a count: not one per row
        kind = re.sub(r"\d+", "N", message)  # which conversation, how many tokens: the same kind
        entry = notes.setdefault(kind, [0, message])
        entry[0] += 1

    def masks(batch):
        out = {"input_ids": [], "labels": [], "trained": []}
        for index in batch["index"]:
            try:
                formatted = hook.sft_spec_format(item=item, run=run, messages=item.conversations[index],
                                                 add_generation_prompt=False)
            except SpecError as exc:
                raise _about_conversation(item, index, exc) from None
            example = hook.sft_spec_make_mask(item=item, run=run, formatted=formatted, index=index)
            out["input_ids"].append(example.input_ids)
            out["labels"].append(example.labels)
            out["trained"].append(sum(1 for label in example.labels if label != IGNORE_INDEX))
        return out

    indices = datasets.Dataset.from_dict({"index": list(range(len(item.conversations)))})
    fresh = not cache.exists()
    run.note_sink = counted
    try:
        with _quiet_datasets():
            examples = indices.map(masks, batched=True, batch_size=1000, remove_columns=["index"],
                                   cache_file_name=str(cache), new_fingerprint=key, load_from_cache_file=True)
    finally:
        run.note_sink = None
    if fresh:
        atomic_write_text(sidecar, json.dumps(list(notes.values()), ensure_ascii=False))
    elif sidecar.exists():
        notes = {m: e for e, m in ((e, e[1]) for e in json.loads(sidecar.read_text(encoding="utf-8")))}
    for count, message in notes.values():
        run.note(message if count == 1 else f"{message} (and {count - 1} more conversations like it)")
    run.note(f"{len(examples)} training conversations masked in batches (datasets.map, cached: "
             f"{'no, made now' if fresh else 'yes'})")
    return examples


class _quiet_datasets:
    """datasets' progress bars off while it maps: the terminal reporter shows the phases."""

    def __enter__(self):
        import datasets

        self.was = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()

    def __exit__(self, *exc):
        import datasets

        if self.was:
            datasets.utils.logging.enable_progress_bar()
