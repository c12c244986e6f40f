"""The data phase of loading: a spec's inline conversations, its ``data.files`` and ``data.dataset``, each
source read through ``sft_spec_load_data`` (the built-in here; a plugin may read its own sources first).

The built-in reads every local format ``datasets`` reads: JSON Lines, JSON, CSV, Parquet, Arrow, and a
folder saved with ``save_to_disk`` (``split:`` picks one of a ``DatasetDict``), and a hub dataset that is
already in the local ``datasets`` cache (``data.dataset``; never a download: a dataset that is not cached is
an error at once). ``select: "0:100"`` or ``fraction: 0.1`` keeps a part of the rows. TRL's dataset
layouts are detected: conversational (``messages``), prompt/completion (strings or turns) and plain ``text``
(language modelling), plus key names and ``role_map`` for other conversational layouts; every row of a file
must have the file's layout, and a row that fits none or several is an error at that row.

Errors name the file and line or row (``data/weibo.jsonl:3:7: not valid JSON: ...``,
``data/train.parquet: row 17: ...``); every file a spec names must lie inside the spec's folder.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sft_spec import hookimpl
from sft_spec.errors import Location, SpecError, did_you_mean, relpath
from sft_spec.loading.data import check_conversation
from sft_spec.loading.paths import check_inside
from sft_spec.loading.wording import kind_of
from sft_spec.registry import SpecSection
from sft_spec.spec import Message
from sft_spec.state import LocatedConversation


class RowSelection(BaseModel):
    """How a source's rows become conversations: which rows, which layout, which keys."""

    model_config = ConfigDict(extra="forbid")
    select: str | None = Field(None, description="Rows to keep, as a Python slice: \"0:100\", \"100:\"")
    fraction: float | None = Field(None, gt=0, le=1, description="Keep the first share of the rows (after select)")
    layout: Literal["auto", "messages", "prompt_completion", "text"] = Field(
        "auto", description="TRL's dataset layout; auto detects it from the first row, and every row must match")
    conversation_key: str = Field("messages", description="Key holding the list of turns in each line")
    role_key: str = Field("role", description="Key of a turn's role")
    content_key: str = Field("content", description="Key of a turn's text")
    role_map: dict[str, str] = Field(default_factory=dict, description="Rename roles: {human: user, gpt: assistant}")
    prompt_key: str = Field("prompt", description="prompt/completion layout: the prompt's key (text or turns)")
    completion_key: str = Field("completion", description="prompt/completion layout: the completion's key")
    text_key: str = Field("text", description="text layout: the key of the text (loss on all of it)")


class DataFile(RowSelection):
    """One ``data.files`` entry: a file (or a folder saved with ``save_to_disk``) and how to read it."""

    path: str = Field(description="A data file or folder inside the spec's folder, relative to the spec file")
    format: Literal["json", "csv", "parquet", "arrow", "disk"] | None = Field(
        None, description="Default: from the suffix (.jsonl .json .csv .parquet .arrow), disk for a saved folder")
    split: str | None = Field(None, description="The split of a folder saved from a DatasetDict")


class HubDataset(RowSelection):
    """``data.dataset``: a hub dataset that is already in the local ``datasets`` cache."""

    path: str = Field(description="The dataset's hub id, e.g. trl-lib/Capybara")
    name: str | None = Field(None, description="Its configuration name")
    split: str = Field("train", description="The split")
    revision: str | None = Field(None, description="The revision that was cached")


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    conversations: list[list[Message]] = Field(default_factory=list, description="Inline training conversations")
    files: list[DataFile] = Field(default_factory=list, description="Data files (JSON Lines, JSON, CSV, Parquet, "
                                  "Arrow, save_to_disk folders)")
    dataset: HubDataset | None = Field(None, description="A hub dataset from the local datasets cache (offline)")


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


def _read_jsonl(target: Path, shown: str) -> list[tuple[Any, Location]]:
    """JSON Lines, line by line: a bad line is named with its line and column."""
    from .rows import Budget, check_separators, no_duplicate_keys

    raw = target.read_bytes()
    check_separators(raw, shown)  # values, bounded before parsing
    rows = []
    budget = Budget(shown)
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = Location(shown, lineno)
        budget.add(1, 1, where=where)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            column = len(line[: exc.start].decode("utf-8", "replace")) + 1
            raise SpecError(f"line is not valid UTF-8 (byte 0x{line[exc.start]:02x})",
                            Location(shown, lineno, column)) from None
        try:
            rows.append((json.loads(text, object_pairs_hook=no_duplicate_keys), where))
        except json.JSONDecodeError as exc:
            raise SpecError(f"not valid JSON: {exc.msg}", Location(shown, lineno, exc.colno)) from None
        except (ValueError, RecursionError) as exc:  # huge integers, nesting deeper than Python recurses
            raise SpecError(f"not valid JSON: {type(exc).__name__}: {str(exc)[:100]}", where) from None
    return rows


def _resolved(path: Path, shown: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise SpecError(f"{shown}: {path.name} cannot be resolved: {exc}") from None


def check_saved_folder(folder: Path, target: Path, shown: str) -> None:
    """Every file of a ``save_to_disk`` folder, and every file and split its JSON metadata names, lies inside
    the spec's folder: ``state.json`` lists its Arrow files by relative name and ``dataset_dict.json`` its
    splits as folder names, and ``datasets`` follows either (``../``, a symlink) wherever it points."""
    root = Path(folder).resolve()
    for directory, subfolders, files in os.walk(target):
        here = Path(directory)
        # Resolved before relpath: "up/../x" through a link "up" to the spec folder is the folder's parent.
        for name in subfolders + files:
            check_inside(folder, os.path.relpath(_resolved(here / name, shown), root), f"{shown}: file")
        named = []
        for meta in ("state.json", "dataset_dict.json"):
            if meta in files:
                try:
                    doc = json.loads((here / meta).read_text(encoding="utf-8"))
                    named += [entry["filename"] for entry in doc.get("_data_files", [])] + list(doc.get("splits", []))
                except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
                    raise SpecError(f"{shown}: {meta} is not a datasets metadata file ({type(exc).__name__})") from None
        for name in named:
            check_inside(folder, os.path.relpath(_resolved(here / str(name), shown), root),
                         f"{shown}: {name!r} (in its metadata)")


def _read_datasets(target: Path, shown: str, fmt: str, split: str | None) -> list[tuple[Any, Location]]:
    """Arrow files and save_to_disk folders through datasets (memory-mapped); rows are located by number."""
    import datasets

    from .rows import check_arrow_stream

    for arrow in [target] if fmt == "arrow" else sorted(target.rglob("*.arrow")):
        check_arrow_stream(arrow, shown if arrow == target else f"{shown}/{arrow.relative_to(target)}")
    try:
        loaded = datasets.Dataset.from_file(str(target)) if fmt == "arrow" else datasets.load_from_disk(str(target))
    except Exception as exc:  # noqa: BLE001 - a file datasets cannot read is this spec's problem
        raise SpecError(f"datasets cannot read {shown}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None or split not in loaded:
            raise SpecError(did_you_mean(str(split), list(loaded), "split") if split else
                            f"{shown} holds the splits {', '.join(loaded)}: choose one with split:")
        loaded = loaded[split]
    return [(row, Location(f"{shown}: row {i + 1}")) for i, row in enumerate(loaded)]


def read_source_rows(item, source) -> list[tuple[Any, Location]]:
    """The rows of one data.files entry, each with where it was written, size and path rules first."""
    from .rows import file_format, read_rows

    target = check_inside(item.folder, source.path, "data file")
    shown = relpath(target)
    if not target.exists():
        raise SpecError(f"data file not found: {source.path} (paths are relative to the spec file's folder)")
    fmt = source.format or ("disk" if target.is_dir() else None)
    try:
        if target.is_dir():
            check_saved_folder(item.folder, target, shown)
        if fmt == "disk" or (fmt is None and target.is_dir()):
            size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        else:
            size = target.stat().st_size
        if size > MAX_DATA_BYTES:
            raise SpecError(f"data file {source.path} is {_size(size)}; the limit is {_size(MAX_DATA_BYTES)} "
                            "(a spec is a test, not a training job)")
        if fmt in ("disk", "arrow") or (fmt is None and target.suffix == ".arrow"):
            return _read_datasets(target, shown, fmt or "arrow", source.split)
        if fmt is None and target.suffix.lower() in (".jsonl", ".ndjson"):
            return _read_jsonl(target, shown)
        return read_rows(item.folder, source.path, file_format(source.path, fmt), what="data file")
    except OSError as exc:
        raise SpecError(f"cannot read data file {source.path}: {exc.strerror or exc}") from None


#: A hub dataset id: ``name`` or ``owner/name``. Anything else (a path) would make ``load_dataset`` read a
#: local folder from anywhere, past the spec-folder rule.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def check_hub_id(folder: Path, path: str) -> None:
    import datasets.packaged_modules

    if not HUB_ID.match(path) or ".." in path or path.endswith((".py", ".json", ".jsonl", ".csv", ".parquet")):
        raise SpecError(f"data.dataset path {path!r} is not a hub dataset id (name or owner/name): local data "
                        "goes in data.files, inside the spec's folder")
    if path in getattr(datasets.packaged_modules, "_PACKAGED_DATASETS_MODULES", {"json", "csv", "parquet"}):
        raise SpecError(f"data.dataset path {path!r} is one of datasets' builders, which read local files: "
                        "use data.files for them")
    for base in (Path(folder), Path.cwd()):  # load_dataset prefers a local folder of that name to the hub
        if (base / path).exists():
            raise SpecError(f"data.dataset path {path!r} names the local path {relpath(base / path)}; a hub dataset "
                            "is read from the datasets cache only: local data goes in data.files")


def read_hub_rows(source, folder: Path) -> list[tuple[Any, Location]]:
    """A hub dataset from the local datasets cache only: offline, so a missing one fails at once."""
    import datasets
    import huggingface_hub.constants as hub_constants

    check_hub_id(folder, source.path)

    shown = source.path + (f" ({source.name})" if source.name else "") + f"[{source.split}]"
    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        loaded = datasets.load_dataset(source.path, source.name, split=source.split, revision=source.revision)
    except Exception as exc:  # noqa: BLE001 - not cached (or no such split): said plainly, in seconds
        raise SpecError(f"dataset {shown} is not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}): "
                        f"sft-spec never downloads at run time; load it once where the hub is reachable, or copy "
                        f"it into the spec's folder and use data.files ({type(exc).__name__})") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
    return [(row, Location(f"{shown}: row {i + 1}")) for i, row in enumerate(loaded)]


def select_rows(rows: list, source, shown: str) -> list:
    """``select: "0:100"`` (a Python slice) and then ``fraction: 0.1`` (the first share)."""
    if source.select:
        parts = source.select.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            rows = rows[slice(*(int(p) if p.strip() else None for p in parts))]
        except ValueError:
            raise SpecError(f"select {source.select!r}: expected a slice such as \"0:100\" or \"100:\"") from None
    if source.fraction is not None:
        rows = rows[: max(1, math.ceil(len(rows) * source.fraction))]
    if not rows:
        raise SpecError(f"{shown}: no rows are left after select/fraction")
    return rows


LAYOUTS = {"messages": "conversational (messages)", "prompt_completion": "prompt/completion", "text": "text"}


def row_layout(row: dict, source) -> str | None:
    """The TRL layout a row is in; None when it fits none. Several at once is an error (ambiguous) unless
    ``layout:`` names one of them."""
    found = [name for name, keys in (("messages", [source.conversation_key]),
                                      ("prompt_completion", [source.prompt_key, source.completion_key]),
                                      ("text", [source.text_key])) if all(k in row for k in keys)]
    if source.layout != "auto" and source.layout in found:
        return source.layout
    if len(found) > 1:
        raise ValueError(f"the row fits several layouts ({', '.join(LAYOUTS[f] for f in found)}): set layout:")
    return found[0] if found else None


def _turns(value, source, what: str, where: Location) -> list[dict]:
    if not isinstance(value, list):
        raise SpecError(f"{what!r} must be a list of turns", where)
    turns = []
    for t, turn in enumerate(value):
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
    return turns


def to_conversation(record: dict, source, layout: str, where: Location) -> LocatedConversation:
    """One row (an object: conversations_from_rows checks that) in the file's layout."""
    if layout == "text":
        text = record[source.text_key]
        if not isinstance(text, str) or not text:
            raise SpecError(f"{source.text_key!r} must be a non-empty string", where)
        # A plain text: no roles, no template; the formatter passes it through (loss on all of it, or after
        # the response template with completion_only, as TRL's language-modelling layout).
        conversation = LocatedConversation([{"role": "text", "content": text}])
        conversation.plain_text = text
    else:
        if layout == "messages":
            turns = _turns(record[source.conversation_key], source, source.conversation_key, where)
        else:
            prompt, completion = record[source.prompt_key], record[source.completion_key]
            turns = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                     else _turns(prompt, source, source.prompt_key, where))
            turns += ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
                      else _turns(completion, source, source.completion_key, where))
        problem = check_conversation(turns)
        if problem:
            raise SpecError(problem, where)
        conversation = LocatedConversation(turns)
    conversation.location = where
    return conversation


def conversations_from_rows(rows: list, source, shown: str) -> list[LocatedConversation]:
    """Every row in the file's one layout (the first row's, or the one written), located errors otherwise."""
    rows = select_rows(rows, source, shown)
    layout = None if source.layout == "auto" else source.layout
    out = []
    for record, where in rows:
        if not isinstance(record, dict):
            raise SpecError(f"each line must be a JSON object, got {kind_of(record)}", where)
        try:
            found = row_layout(record, source)
        except ValueError as exc:
            raise SpecError(str(exc), where) from None
        if found is None:
            wanted = [source.conversation_key, f"{source.prompt_key}+{source.completion_key}", source.text_key]
            close = did_you_mean(source.conversation_key, list(record), "key").split(". ")[1:2]
            raise SpecError(f"the row has none of the keys of TRL's layouts ({', '.join(wanted)}); its keys: "
                            f"{', '.join(map(str, record))} (set conversation_key, prompt_key/completion_key or "
                            f"text_key){'. ' + close[0] if close and close[0].startswith('Did') else ''}", where)
        if layout is None:
            layout = found
        elif found != layout:
            raise SpecError(f"this row is {LAYOUTS[found]}, and the file's rows are {LAYOUTS[layout]}: one layout "
                            "per file", where)
        out.append(to_conversation(record, source, layout, where))
    return out


@hookimpl(trylast=True)
def sft_spec_load_data(source, item, config):
    if isinstance(source, HubDataset):
        return conversations_from_rows(read_hub_rows(source, item.folder), source, source.path)
    rows = read_source_rows(item, source)
    if not rows:
        # No line to point at in the data file: point at the spec's path key instead.
        raise SpecError(f"data file {source.path} holds no conversations (each line: one JSON object with "
                        f"{source.conversation_key!r})")
    return conversations_from_rows(rows, source, source.path)


@hookimpl(tryfirst=True)
def sft_spec_resolve_spec(item, config) -> list[SpecError]:
    """``item.conversations``: the inline ones, then each file's; every problem located. First of the
    resolvers: an eval set compares its prompts with the training data."""
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
    sources = [(source, item.locate("data", "files", i, "path"), f"data.files[{i}].path")
               for i, source in enumerate(data.files)]
    if data.dataset is not None:
        sources.append((data.dataset, item.locate("data", "dataset", "path"), "data.dataset.path"))
    for source, where, key in sources:
        try:
            loaded = config.hook.sft_spec_load_data(source=source, item=item, config=config)
        except SpecError as exc:
            errors.append(SpecError(exc.message, exc.location or where, exc.key or key))
            continue
        except ValueError as exc:  # the path rule
            errors.append(SpecError(str(exc), where, key=key))
            continue
        if loaded is None:
            errors.append(SpecError(f"no plugin reads the data source {source.path!r}", where, key=key))
            continue
        item.conversations.extend(loaded)
        item.sources.extend(getattr(conv, "location", None) or where for conv in loaded)
    if not item.conversations and not errors:
        errors.append(SpecError("no training conversations: add data.conversations, data.files or data.dataset",
                                item.locate("data"), key="data"))
    return errors


@hookimpl
def sft_spec_cache_key(item, config):
    """The bytes of every data file (the conversations read from them are in the key already; a file's
    bytes also catch what a reader skipped)."""
    from ..common.recorded import content_hash

    data = item.section(DATA)
    return {"data_files": [content_hash(Path(item.path).parent / f.path) for f in data.files] if data else []}
