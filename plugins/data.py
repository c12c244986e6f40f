"""The data phase of loading: a spec's inline conversations and its ``data.files``, each file read
through ``sft_spec_load_data`` (the built-in reads JSON Lines, keys mapped as the spec says).

Errors name the data file and line (``data/weibo.jsonl:3:7: not valid JSON: ...``); every file a spec
names must lie inside the spec's folder.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field

from sft_spec import hookimpl
from sft_spec.errors import Location, SpecError, did_you_mean, relpath
from sft_spec.loading.data import check_conversation
from sft_spec.loading.paths import check_inside
from sft_spec.loading.wording import kind_of
from sft_spec.registry import SpecSection
from sft_spec.spec import Message
from sft_spec.state import LocatedConversation


class DataFile(BaseModel):
    """One ``data.files`` entry: a file of conversations and how to read it."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="A data file inside the spec's folder, relative to the spec file")
    conversation_key: str = Field("messages", description="Key holding the list of turns in each line")
    role_key: str = Field("role", description="Key of a turn's role")
    content_key: str = Field("content", description="Key of a turn's text")
    role_map: dict[str, str] = Field(default_factory=dict, description="Rename roles: {human: user, gpt: assistant}")


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    conversations: list[list[Message]] = Field(default_factory=list, description="Inline training conversations")
    files: list[DataFile] = Field(default_factory=list, description="JSON Lines files of conversations")


DATA = SpecSection("data", DataSpec, "The training conversations", required=True)


@hookimpl
def sft_spec_register_spec_sections(register) -> None:
    register(DATA)


#: A data file larger than this is refused: a spec is a test, not a training job.
MAX_DATA_BYTES = 64 * 1024 * 1024


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def read_jsonl_conversations(item, source) -> list[list[dict]]:
    """Conversations from a JSON Lines file; errors name file and line."""
    target = check_inside(item.folder, source.path, "data file")
    shown = relpath(target)
    if not target.is_file():
        raise SpecError(f"data file not found: {source.path} (paths are relative to the spec file's folder)")
    try:
        size = target.stat().st_size
        if size > MAX_DATA_BYTES:
            raise SpecError(f"data file {source.path} is {_size(size)}; the limit is {_size(MAX_DATA_BYTES)} "
                            "(a spec is a test, not a training job)")
        raw = target.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read data file {source.path}: {exc.strerror or exc}") from None
    conversations = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = Location(shown, lineno)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            column = len(line[: exc.start].decode("utf-8", "replace")) + 1
            raise SpecError(f"line is not valid UTF-8 (byte 0x{line[exc.start]:02x})",
                            Location(shown, lineno, column)) from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"not valid JSON: {exc.msg}", Location(shown, lineno, exc.colno)) from None
        except (ValueError, RecursionError) as exc:  # huge integers, nesting deeper than Python recurses
            raise SpecError(f"not valid JSON: {type(exc).__name__}: {str(exc)[:100]}", where) from None
        conversation = LocatedConversation(_conversation(record, source, where))
        conversation.location = where
        conversations.append(conversation)
    if not conversations:
        # No line to point at in the data file: point at the spec's path key instead.
        raise SpecError(f"data file {source.path} holds no conversations (each line: one JSON object with "
                        f"{source.conversation_key!r})")
    return conversations


def _conversation(record, source, where: Location) -> list[dict]:
    if not isinstance(record, dict):
        raise SpecError(f"each line must be a JSON object, got {kind_of(record)}", where)
    if source.conversation_key not in record:
        raise SpecError(did_you_mean(source.conversation_key, list(record), "conversation_key")
                        .replace("unknown conversation_key", "no conversation_key"), where)
    turns_raw = record[source.conversation_key]
    if not isinstance(turns_raw, list):
        raise SpecError(f"{source.conversation_key!r} must be a list of turns", where)
    turns = []
    for t, turn in enumerate(turns_raw):
        if not isinstance(turn, dict):
            raise SpecError(f"turn {t} must be an object", where)
        for key in (source.role_key, source.content_key):
            if key not in turn:
                raise SpecError(f"turn {t} has no {key!r} key (keys: {', '.join(map(str, turn))}); "
                                "set role_key/content_key", where)
        role, content = turn[source.role_key], turn[source.content_key]
        if not isinstance(content, str) or not isinstance(role, str):
            raise SpecError(f"turn {t}: role and content must be strings", where)
        turns.append({"role": source.role_map.get(role, role), "content": content})
    problem = check_conversation(turns)
    if problem:
        raise SpecError(problem, where)
    return turns


@hookimpl(trylast=True)
def sft_spec_load_data(source, item, config):
    return read_jsonl_conversations(item, source)


@hookimpl(tryfirst=True)
def sft_spec_validate_spec(item, config) -> list[SpecError]:
    """``item.conversations``: the inline ones, then each file's; every problem located. Tryfirst: other
    plugins' checks see the conversations."""
    errors: list[SpecError] = []
    data = item.section(DATA)
    if data is None:  # its own errors say why
        return errors
    for i, conv in enumerate(data.conversations):
        turns = [m.model_dump() for m in conv]
        problem = check_conversation(turns)
        if problem:
            errors.append(SpecError(problem, item.locate("data", "conversations", i), key=f"data.conversations[{i}]"))
        item.conversations.append(turns)
        item.sources.append(item.locate("data", "conversations", i))
    for i, source in enumerate(data.files):
        where, key = item.locate("data", "files", i, "path"), f"data.files[{i}].path"
        try:
            loaded = config.hook.sft_spec_load_data(source=source, item=item, config=config)
        except SpecError as exc:
            errors.append(SpecError(exc.message, exc.location or where, exc.key or key))
            continue
        except ValueError as exc:  # the path rule
            errors.append(SpecError(str(exc), where, key=key))
            continue
        if loaded is None:
            errors.append(SpecError(f"no plugin reads the data file {source.path!r}", where, key=key))
            continue
        item.conversations.extend(loaded)
        item.sources.extend(getattr(conv, "location", None) or where for conv in loaded)
    if not item.conversations and not errors:
        errors.append(SpecError("no training conversations: add data.conversations or data.files",
                                item.locate("data"), key="data"))
    return errors
