"""Rows of a table file, each with where it was written: JSON Lines, JSON, CSV and Parquet, the formats
``datasets`` reads with its ``json``, ``csv`` and ``parquet`` builders, read without its cache (a spec
run leaves nothing in ``HF_HOME``) and with errors that name the file and line.

A JSON file holds a list of objects, or an object whose one list-valued key holds them (``{"data": [...]}``,
as ``datasets``' ``field=``). Every path goes through the spec-folder rule first.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from sft_spec.errors import Location, SpecError, relpath
from sft_spec.loading.paths import check_inside
from sft_spec.loading.wording import kind_of

#: Suffixes and the ``datasets`` builder name they stand for.
FORMATS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
#: A file larger than this is refused: a spec is a test, not a training job.
MAX_ROWS_BYTES = 64 * 1024 * 1024
#: What a file may decode to. A compressed table (Parquet, Arrow) or a wide header over empty cells (CSV)
#: expands far past its size on disk: rows, cells and decoded bytes are counted before and while decoding.
MAX_ROWS = 1_000_000
MAX_CELLS = 10_000_000
MAX_DECODED_BYTES = 1024 * 2**20

Row = tuple[dict[str, Any], Location]


class Budget:
    """Rows, cells and decoded bytes read so far from one file; a located error past any bound."""

    def __init__(self, shown: str):
        self.shown, self.rows, self.cells, self.bytes = shown, 0, 0, 0

    def add(self, rows: int, cells: int, nbytes: int = 0, where: Location | None = None) -> None:
        self.rows, self.cells, self.bytes = self.rows + rows, self.cells + cells, self.bytes + nbytes
        for count, limit, what in ((self.rows, MAX_ROWS, "rows"), (self.cells, MAX_CELLS, "cells"),
                                   (self.bytes, MAX_DECODED_BYTES, "bytes decoded")):
            if count > limit:
                raise SpecError(f"the file holds more than {limit:,} {what} (the limit for a spec's table: a spec is "
                                "a test, not a training job)", where or Location(self.shown))


def values_in(array) -> int:
    """Every value an Arrow array holds, nested ones included: a row holding a list of 100,000,000 nulls is
    a few bytes of Arrow and 100,000,001 Python objects."""
    import pyarrow

    kind = array.type
    if pyarrow.types.is_dictionary(kind):
        return len(array)
    if pyarrow.types.is_list(kind) or pyarrow.types.is_large_list(kind) or pyarrow.types.is_fixed_size_list(kind) \
            or pyarrow.types.is_map(kind):
        return len(array) + values_in(array.flatten())
    if pyarrow.types.is_struct(kind):
        return len(array) + sum(values_in(array.field(i)) for i in range(kind.num_fields))
    return len(array)


def batch_values(batch) -> int:
    return sum(values_in(column) for column in batch.columns)


def check_parquet_metadata(metadata, shown: str) -> None:
    """A Parquet footer's row count, values (nested ones included: each column chunk counts its leaf values)
    and uncompressed size, against the bounds, before any page is decoded."""
    groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
    declared = sum(group.total_byte_size for group in groups)
    leaves = sum(group.column(j).num_values for group in groups for j in range(group.num_columns))
    Budget(shown).add(metadata.num_rows, max(leaves, metadata.num_rows * max(1, metadata.num_columns)), declared)


def check_separators(text: str | bytes, shown: str) -> None:
    """A text table's values, bounded before it is parsed: each value after the first follows a separator
    (``,`` in JSON and CSV, or an opening bracket), so their count bounds what parsing builds."""
    separators = (b",", b"[", b"{") if isinstance(text, bytes) else (",", "[", "{")
    Budget(shown).add(0, sum(text.count(s) for s in separators))


def check_arrow_stream(path: Path, shown: str) -> None:
    """An Arrow IPC file (``datasets``' cache format) read batch by batch, each counted before the next is
    decompressed: a few KB of compressed buffers can declare gigabytes."""
    import pyarrow
    import pyarrow.ipc

    budget = Budget(shown)
    try:
        with pyarrow.memory_map(str(path)) as source:
            try:
                reader = pyarrow.ipc.open_stream(source)
                batches = iter(reader)
            except pyarrow.ArrowInvalid:
                source.seek(0)
                file_reader = pyarrow.ipc.open_file(source)
                batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
            for batch in batches:
                budget.add(batch.num_rows, batch_values(batch), batch.nbytes)
    except (pyarrow.ArrowException, OSError) as exc:
        raise SpecError(f"not a readable Arrow file: {exc}", Location(shown)) from None


def file_format(path: str, given: str | None) -> str:
    if given:
        return given
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise SpecError(f"cannot tell the format of {path!r} from its suffix: set format: json, csv or parquet "
                        f"(suffixes known: {', '.join(FORMATS)})")
    return FORMATS[suffix]


def read_rows(folder: Path, path: str, given_format: str | None = None, what: str = "data file") -> list[Row]:
    """Every row of ``path`` (relative to ``folder``, and inside it) as a dict with its location."""
    target = check_inside(folder, path, what)
    shown = relpath(target)
    if not target.is_file():
        raise SpecError(f"{what} not found: {path} (paths are relative to the spec file's folder)")
    fmt = file_format(path, given_format)
    try:
        size = target.stat().st_size
        if size > MAX_ROWS_BYTES:
            raise SpecError(f"{what} {path} is {size / 2**20:.1f} MiB; the limit is {MAX_ROWS_BYTES // 2**20} MiB")
        raw = target.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if fmt == "parquet":
        return _parquet(raw, shown)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})", Location(shown, line)) from None
    lines = Path(path).suffix.lower() in (".jsonl", ".ndjson")
    check_separators(text, shown)
    rows = _csv(text, shown) if fmt == "csv" else _json(text, shown, lines)
    for row, where in rows:
        if not isinstance(row, dict):
            raise SpecError(f"each row must be an object, got {kind_of(row)}", where)
    return rows


def _json(text: str, shown: str, lines: bool) -> list[Row]:
    if not lines:  # a .json file: one document, or JSON Lines after all (datasets reads both)
        try:
            value = loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":
                raise SpecError(f"not valid JSON: {exc.msg}", Location(shown, exc.lineno, exc.colno)) from None
            return _json(text, shown, lines=True)
        except (ValueError, RecursionError) as exc:  # a duplicate key, huge integers, nesting deeper than Python
            raise SpecError(f"not valid JSON: {type(exc).__name__}: {str(exc)[:100]}", Location(shown)) from None
        if isinstance(value, dict):
            lists = [k for k, v in value.items() if isinstance(v, list)]
            if len(lists) != 1:
                raise SpecError("a JSON file holds a list of rows, or an object with one list of rows "
                                f"(found lists under: {', '.join(lists) or 'none'})", Location(shown, 1))
            value = value[lists[0]]
        if not isinstance(value, list):
            raise SpecError(f"a JSON file holds a list of rows, got {kind_of(value)}", Location(shown, 1))
        # One document: a row is located by its number in the list, as "row N".
        budget = Budget(shown)
        budget.add(len(value), sum(len(row) if isinstance(row, dict) else 1 for row in value))
        return [(row, Location(f"{shown}: row {i + 1}")) for i, row in enumerate(value)]
    rows = []
    budget = Budget(shown)
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((loads(line), Location(shown, lineno)))
            budget.add(1, len(rows[-1][0]) if isinstance(rows[-1][0], dict) else 1, where=Location(shown, lineno))
        except json.JSONDecodeError as exc:
            raise SpecError(f"not valid JSON: {exc.msg}", Location(shown, lineno, exc.colno)) from None
        except (ValueError, RecursionError) as exc:
            raise SpecError(f"not valid JSON: {type(exc).__name__}: {str(exc)[:100]}", Location(shown, lineno)) \
                from None
    return rows


class WrittenNumber(float):
    """A JSON number that remembers how it was written: a reference ``1.50`` stays "1.50", ``1e2`` stays
    "1e2" (as text, never "1.5" or "100.0")."""

    __slots__ = ("text",)  # no __dict__: a file of many numbers costs what floats cost, not twice that

    def __new__(cls, text: str):
        number = super().__new__(cls, text)
        number.text = text
        return number


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON (JSON numbers are finite; write it as a string)")


def loads(text: str):
    """JSON as the standard defines it: duplicate keys, NaN and Infinity refused, numbers kept as written."""
    return json.loads(text, object_pairs_hook=no_duplicate_keys, parse_float=WrittenNumber,
                      parse_constant=_not_json)


def no_duplicate_keys(pairs: list) -> dict:
    """A key written twice in one object is refused: JSON keeps the last silently, and a row's text with it."""
    row = dict(pairs)
    if len(row) != len(pairs):
        seen: set = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {twice!r} is written twice in one object")
    return row


def named_twice(names: list[str]) -> list[str]:
    """The names that occur more than once, sorted: columns a reader would fold into one in silence."""
    return sorted({name for name in names if names.count(name) > 1})


def _csv(text: str, shown: str) -> list[Row]:
    csv.field_size_limit(MAX_ROWS_BYTES)  # a cell may be as large as the file may be; csv's default is 128 KiB
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    budget = Budget(shown)
    try:
        # Unnamed columns (a spreadsheet's empty trailing ones) hold nothing a layout reads.
        twice = named_twice([name for name in reader.fieldnames or [] if name])
        if twice:  # DictReader would keep the last column of a name, and drop the others' cells in silence
            raise SpecError(f"the header names the column{'s' if len(twice) > 1 else ''} "
                            f"{', '.join(map(repr, twice))} twice", Location(shown, 1))
        for row in reader:
            if None in row:  # more cells than the header names
                raise SpecError(f"row has {len(reader.fieldnames or []) + len(row[None])} cells, the header "
                                f"{len(reader.fieldnames or [])}", Location(shown, reader.line_num))
            if None in row.values():  # fewer cells than the header names
                missing = [k for k, v in row.items() if v is None]
                raise SpecError(f"row has no cell for {', '.join(map(repr, missing))} (fewer cells than the header)",
                                Location(shown, reader.line_num))
            # A header of 100,000 names over rows of bare commas: a few bytes a row, 100,000 cells each.
            budget.add(1, len(row), where=Location(shown, reader.line_num))
            rows.append((dict(row), Location(shown, reader.line_num)))
    except csv.Error as exc:
        raise SpecError(f"not valid CSV: {exc}", Location(shown, reader.line_num)) from None
    return rows


def _parquet(raw: bytes, shown: str) -> list[Row]:
    import pyarrow
    import pyarrow.parquet as pq

    rows: list[Row] = []
    budget = Budget(shown)
    try:
        parquet = pq.ParquetFile(pyarrow.BufferReader(raw))
        twice = named_twice(parquet.schema_arrow.names)
        if twice:  # to_pylist would keep one column of a name, and drop the others in silence
            raise SpecError(f"the file has the column{'s' if len(twice) > 1 else ''} "
                            f"{', '.join(map(repr, twice))} twice", Location(shown))
        check_parquet_metadata(parquet.metadata, shown)
        # Batch by batch: a whole table's to_pylist() holds Arrow's buffers and every Python row at once; each
        # batch is counted before it becomes Python objects (the footer's sizes are the writer's word).
        for batch in parquet.iter_batches(batch_size=1024):
            budget.add(batch.num_rows, batch_values(batch), batch.nbytes)
            # Parquet has no lines: a row is located by its number, as "row N".
            rows += [(row, Location(f"{shown}: row {len(rows) + i + 1}")) for i, row in enumerate(batch.to_pylist())]
    except (pyarrow.ArrowException, OSError) as exc:
        raise SpecError(f"not a readable Parquet file: {exc}", Location(shown)) from None
    return rows
