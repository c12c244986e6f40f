"""Formatters: how a conversation becomes the text the model trains on.

``chat_template`` uses the tokenizer's own template (as the reference recipe does); ``template`` uses
a Jinja2 template from the spec, rendered in a sandbox because specs may come from pull requests.
Both report where each assistant turn lies in the text, which the loss masks need.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field

from sft_spec import hookimpl
from sft_spec.errors import Location, SpecError, did_you_mean, relpath
from sft_spec.loading.expectations import plugin_validate
from sft_spec.loading.paths import check_inside
from sft_spec.registry import SpecSection
from sft_spec.state import ChatMarkers, FormattedText


class FormatSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    formatter: str = Field("chat_template", description="Plugin that turns a conversation into text")
    template: str | None = Field(
        None, description="Jinja2 chat template (inline, or a file path) for formatter: template"
    )
    collator: str = Field("completion_only", description="Plugin that decides which tokens carry the loss")
    response_template: str | None = Field(
        None,
        description="completion_only: the loss starts after the last occurrence; derived from the chat "
        "template when left out",
    )
    instruction_template: str | None = Field(
        None,
        description="completion_only: with it, every response between instruction templates carries the loss "
        "(multi-turn)",
    )
    add_eos: bool = Field(
        True,
        description="Append the tokenizer's EOS token to each training text, as the reference recipe does",
    )


FORMAT = SpecSection("format", FormatSpec, "How conversations become text; which tokens carry the loss",
                     default=True)


@hookimpl
def sft_spec_register_spec_sections(register) -> None:
    register(FORMAT)


_SENTINEL_USER = "\x00u\x00"
_SENTINEL_ANSWER = "\x00a\x00"


class ChatTemplateFormatter:
    """The tokenizer's chat template (``format.template`` replaces it when given)."""

    def validate(self, fmt) -> str | None:
        return None

    def render(self, messages: list[dict], tokenizer, template: str | None, add_generation_prompt: bool) -> str:
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise SpecError("the tokenizer has no chat template: set format.template (a Jinja2 chat template) "
                            "or use a model that ships one")
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 chat_template=template)
        except Exception as exc:  # template errors (raise_exception, bad syntax) are spec errors
            raise SpecError(f"the chat template failed: {type(exc).__name__}: {exc}") from None

    def format(self, messages, tokenizer, fmt, *, add_generation_prompt=False, template=None) -> FormattedText:
        return _format_with(self.render, messages, tokenizer, fmt, add_generation_prompt, template)


class JinjaTemplateFormatter(ChatTemplateFormatter):
    """A Jinja2 chat template from the spec, rendered in jinja2's immutable sandbox."""

    def validate(self, fmt) -> str | None:
        if not fmt.template:
            return "formatter 'template' needs format.template (inline Jinja2 or a file path)"
        return None

    def render(self, messages, tokenizer, template, add_generation_prompt) -> str:
        compiled = _compile(template or "")
        try:
            return compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
            )
        except Exception as exc:
            raise SpecError(f"format.template failed: {type(exc).__name__}: {exc}") from None


@lru_cache(maxsize=32)
def _compile(source: str):
    from jinja2 import StrictUndefined, TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateSyntaxError as exc:
        error = SpecError(f"format.template: Jinja2 syntax error on template line {exc.lineno}: {exc.message}")
        error.template_line = exc.lineno  # for validation to point at the line in the spec or the file
        raise error from None


def _placeholder_spans(render, messages, tokenizer, template, text) -> list[tuple[int, int]] | None:
    """Where each assistant answer lies in ``text``, from two more renders whatever the number of turns.

    The conversation is rendered once more with a placeholder for each content: what lies between the
    placeholders is the template's own text, found again in ``text`` around the real contents. None when the
    template treats contents in a way placeholders cannot show (then the exact per-turn method runs).
    """
    marks = [f"\x00{i}\x00" for i in range(len(messages))]
    fake = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
    try:
        skeleton = render(fake, tokenizer, template, False)
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        upto = render(fake[:first + 1], tokenizer, template, False)  # what follows an answer: its turn's end
    except (SpecError, StopIteration):
        return None
    pieces, pos = [], 0
    for mark in marks:
        at = skeleton.find(mark, pos)
        if at < 0:
            return None
        pieces.append(skeleton[pos:at])
        pos = at + len(mark)
    pieces.append(skeleton[pos:])
    end_of_turn = upto[upto.find(marks[first]) + len(marks[first]):]
    if not text.startswith(pieces[0]):
        return None
    pos, spans = len(pieces[0]), []
    for k, message in enumerate(messages):
        after = pieces[k + 1]
        end = text.find(after, pos) if k + 1 < len(messages) else len(text) - len(after)
        if end < pos or text[end:end + len(after)] != after or text[pos:end].strip() != message["content"].strip():
            return None
        if message["role"] == "assistant":
            if not after.startswith(end_of_turn):
                return None
            spans.append((pos, end + len(end_of_turn)))
        pos = end + len(after)
    return spans


def _prefix_spans(render, messages, tokenizer, template, text) -> list[tuple[int, int]]:
    """The exact method: each answer lies between the prompt rendered up to it and the turn rendered with it
    (two renders per answer, so quadratic in the number of turns; only for templates placeholders miss)."""
    spans: list[tuple[int, int]] = []
    search_from = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], tokenizer, template, True)
        upto = render(messages[: i + 1], tokenizer, template, False)
        if text.startswith(upto) and upto.startswith(before) and len(before) >= search_from:
            spans.append((len(before), len(upto)))
            search_from = len(upto)
            continue
        # Templates that rewrite history (e.g. drop earlier reasoning) are not prefix-stable: find the text.
        start = text.find(message["content"], search_from)
        if start < 0:
            raise SpecError(f"cannot find assistant turn {i} in the formatted text")
        spans.append((start, start + len(message["content"])))
        search_from = start + len(message["content"])
    return spans


def _format_with(render, messages, tokenizer, fmt, add_generation_prompt, template) -> FormattedText:
    if add_generation_prompt:
        return FormattedText(text=render(messages, tokenizer, template, True))
    text = render(messages, tokenizer, template, False)
    spans = _placeholder_spans(render, messages, tokenizer, template, text)
    if spans is None:
        spans = _prefix_spans(render, messages, tokenizer, template, text)
    eos = tokenizer.eos_token
    # ChatML-style templates already end each turn with the EOS token: do not add a second one.
    if fmt.add_eos and eos and not text.rstrip().endswith(eos):
        text += eos
        if spans and spans[-1][1] >= len(text) - len(eos) - 2:
            # The final turn's EOS is part of what the model must learn to produce.
            spans[-1] = (spans[-1][0], len(text))
    return FormattedText(text=text, assistant_spans=spans, prompt_end=spans[-1][0] if spans else 0)


@hookimpl(trylast=True)
def sft_spec_chat_markers(item, run) -> ChatMarkers:
    """The response template (``<start_of_turn>model\\n``) and end-of-turn marker of this spec's template.

    Derived by rendering sentinel conversations with the spec's formatter, so they are right for any
    template, a user's own included: the response template is what the generation prompt adds to a
    rendered user turn; the end-of-turn marker is the special token right after an answer.
    """
    fmt = item.section(FORMAT)
    formatter = run.config.registry.formatters[fmt.formatter].obj
    tokenizer = run.loaded.tokenizer
    render = getattr(formatter, "render", None)
    user = [{"role": "user", "content": _SENTINEL_USER}]
    answer = [*user, {"role": "assistant", "content": _SENTINEL_ANSWER}]
    if render is not None:
        without_prompt = render(user, tokenizer, item.chat_template, False)
        with_prompt = render(user, tokenizer, item.chat_template, True)
        full = render(answer, tokenizer, item.chat_template, False)
    else:  # a formatter with format() only: its generation prompt follows the user's text
        with_prompt = formatter.format(user, tokenizer, fmt, add_generation_prompt=True,
                                       template=item.chat_template).text
        without_prompt = with_prompt[: with_prompt.index(_SENTINEL_USER) + len(_SENTINEL_USER)]
        full = formatter.format(answer, tokenizer, fmt, template=item.chat_template).text
    if with_prompt.startswith(without_prompt):
        response_template = with_prompt[len(without_prompt):]
    else:
        response_template = with_prompt.split(_SENTINEL_USER, 1)[-1]
    after_answer = full.split(_SENTINEL_ANSWER, 1)[1] if _SENTINEL_ANSWER in full else ""
    end_of_turn = _first_special(after_answer, tokenizer) or tokenizer.eos_token
    return ChatMarkers(response_template=response_template, end_of_turn=end_of_turn)


def _first_special(text: str, tokenizer) -> str | None:
    """The special token that ``text`` starts with (after whitespace), if any."""
    stripped = text.lstrip()
    specials = sorted(set(getattr(tokenizer, "all_special_tokens", [])) | set(
        getattr(tokenizer, "added_tokens_encoder", {}) or {}), key=len, reverse=True)
    for token in specials:
        if token and stripped.startswith(token):
            return token
    return None


def _template(item) -> str | None:
    """``format.template``: inline Jinja2, or a file inside the spec's folder."""
    template = item.section(FORMAT).template
    if template is None or "{{" in template or "{%" in template or "\n" in template:
        return template
    path = check_inside(item.folder, template, "template")  # ValueError: outside the spec's folder
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read template file {template!r}: {exc.strerror or exc}") from None


@hookimpl
def sft_spec_resolve_spec(item, config) -> list[SpecError]:
    """The spec's formatter exists and accepts its ``format:``; a template file is read into
    ``item.chat_template`` (before the checks, which see it)."""
    fmt, table = item.section(FORMAT), config.registry.formatters
    errors = []
    if fmt.formatter not in table:
        errors.append(SpecError(did_you_mean(fmt.formatter, list(table), "formatter"),
                                item.locate("format", "formatter"), key="format.formatter"))
    else:
        problem = plugin_validate(getattr(table[fmt.formatter].obj, "validate", None), fmt,
                                  f"formatter {fmt.formatter!r}")
        if problem:
            errors.append(SpecError(problem, item.locate("format", "formatter"), key="format.formatter"))
    try:
        item.chat_template = _template(item)
    except ValueError as exc:
        errors.append(SpecError(str(exc), item.locate("format", "template"), key="format.template"))
    if item.chat_template and fmt.formatter == "template":
        try:  # parsed now (sandboxed, nothing rendered): a syntax error is found by validate, at its line
            _compile(item.chat_template)
        except SpecError as exc:
            errors.append(SpecError(exc.message, _template_line(item, getattr(exc, "template_line", 0)),
                                    key="format.template"))
    return errors


def _template_line(item, line: int) -> Location:
    """Where line ``line`` of ``format.template`` is: in its file, or in the spec (a block scalar starts on
    the line after its key)."""
    template = item.section(FORMAT).template or ""
    key = item.locate("format", "template")
    if "{{" not in template and "{%" not in template and "\n" not in template:  # a file's name
        return Location(relpath(check_inside(item.folder, template, "template")), line)
    if "\n" in template and key.line:
        return Location(key.path, key.line + line)
    return key


@hookimpl(trylast=True)
def sft_spec_register_formatters(register) -> None:
    register("chat_template", ChatTemplateFormatter(), "the tokenizer's chat template (format.template overrides it)")
    register("template", JinjaTemplateFormatter(), "a Jinja2 chat template from the spec, sandboxed")


@hookimpl(trylast=True)
def sft_spec_format(item, run, messages, add_generation_prompt) -> FormattedText:
    fmt = item.section(FORMAT)
    plain = getattr(messages, "plain_text", None)
    if plain is not None:
        # A text-layout row (language modelling): no roles, no template, the EOS appended as to any training text.
        eos = run.loaded.tokenizer.eos_token or ""
        return FormattedText(text=plain + (eos if fmt.add_eos and eos and not plain.endswith(eos) else ""))
    formatter = run.config.registry.formatters[fmt.formatter].obj
    try:
        return formatter.format(messages, run.loaded.tokenizer, fmt, add_generation_prompt=add_generation_prompt,
                                template=item.chat_template)
    except SpecError as exc:
        # Template problems belong to the template's line in the spec.
        if exc.location is None and item.doc is not None:
            exc.location = item.doc.locate(("format", "template") if fmt.template else ("format", "formatter"))
        raise
