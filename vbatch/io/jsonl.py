"""JSON lines files, read in chunks of whole lines, each chunk parsed by pyarrow into a table.

What pyarrow's JSON reader would do on its own is changed in three places, so that columns
pass through unchanged and one bad row never fails a file:

- strings that look like dates stay strings (pyarrow would make them timestamps);
- a prompt column whose values mix text with numbers, objects, ... (pyarrow refuses the whole
  chunk) is read as `MIXED_TEXT` (io/mixed_text.py): the other values become `not_text` rows;
  so are the other columns a row may fill with a list or a string (`MIXED_COLUMNS`: token ids,
  stop strings), whose bad cells become error rows;
- errors name the file's real line, invalid UTF-8 included (pyarrow counts rows per chunk).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.json as pa_json

from vbatch.errors import InputError, one_line
from vbatch.io.input_file import InputFile, open_input
from vbatch.io.mixed_text import mixed_text_array
from vbatch.io.schema import MIXED_COLUMNS
from vbatch.io.text_lines import invalid_utf8_offset

_JSON_ROW = re.compile(r" in row (\d+)")
_CHANGED_TYPE = re.compile(r"Column\(/(.*)\) changed from \w+ to \w+")
# A line must be one JSON object. This also keeps a top-level `null` away from pyarrow's JSON
# reader, which crashes (segfault, pyarrow 26) when a block starts with one.
_LINE_NOT_AN_OBJECT = re.compile(rb"^[ \t\r]*[^{ \t\r\n]|[^} \t\r\n][ \t\r]*$", re.MULTILINE)
_MESSAGE_LIMIT = 300


def jsonl_chunks(path: InputFile, block_size: int) -> Iterator[tuple[int, bytes]]:
    """Yield (number of the chunk's first line, whole lines) of about `block_size` bytes each.

    The last chunk runs to the end of the file, a last line without a newline included, so a
    file of at most `block_size` bytes is exactly one chunk (a truncated last line is in it)."""
    with open_input(path) as handle:
        pending, line_number = b"", 1
        data = handle.read(block_size)
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]  # UTF-8 byte order mark
        while data:
            following = handle.read(block_size)
            data, pending = pending + data, b""
            if not following:
                yield line_number, data
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                pending = data  # one line longer than a block: keep reading
            else:
                chunk, pending = data[:cut], data[cut:]
                yield line_number, chunk
                line_number += chunk.count(b"\n")
            data = following


def jsonl_tables(path: InputFile, *, block_size: int, prompt_column: str | None,
                 first_only: bool = False) -> Iterator[tuple[int, pa.Table]]:
    """Yield (first line, table) per non-blank chunk of `path` (only the first with
    `first_only`). `prompt_column` (and each of `MIXED_COLUMNS`) may mix types (read as
    `MIXED_TEXT`). Raises InputError naming the file and line."""
    for first_line, chunk in jsonl_chunks(path, block_size):
        table = parse_jsonl_chunk(path, first_line, chunk, prompt_column)
        if table is not None:
            yield first_line, table
            if first_only:
                return


def parse_jsonl_chunk(path: InputFile, first_line: int, chunk: bytes,
                      prompt_column: str | None) -> pa.Table | None:
    """One chunk of whole lines as a table (None when blank); see the module docstring."""
    if not chunk.strip():
        return None
    if first_line == 1 and chunk.lstrip().startswith(b"["):
        raise InputError(f"{path}: holds a JSON array; vbatch reads JSON lines (an object a line)")
    not_an_object = _LINE_NOT_AN_OBJECT.search(chunk)
    if not_an_object:
        raise InputError(f"{path}: line {_line_at(chunk, first_line, not_an_object.start())}: "
                         "not a JSON object (one {...} per line expected)")
    bad_byte = invalid_utf8_offset(chunk)  # pyarrow's JSON reader does not check UTF-8
    if bad_byte is not None:
        raise InputError(f"{path}: line {_line_at(chunk, first_line, bad_byte)}: invalid UTF8 "
                         "data (the file must be UTF-8 text)")
    try:
        return _text_dates(_read(chunk), chunk)
    except pa.ArrowException as error:
        message = one_line(error, _MESSAGE_LIMIT)
        mixable = {*MIXED_COLUMNS, *([prompt_column] if prompt_column is not None else [])}
        changed = _changed_column(message)
        if changed in mixable:
            return _with_mixed_columns(path, first_line, chunk, mixable, {changed})
        raise _located(path, first_line, chunk, message) from None


def _changed_column(message: str) -> str | None:
    """The top-level column whose type changed within a chunk, from pyarrow's message (a JSON
    pointer: `/prompt_token_ids/[]` names `prompt_token_ids`)."""
    changed = _CHANGED_TYPE.search(message)
    if not changed:
        return None
    return changed.group(1).split("/")[0].replace("~1", "/").replace("~0", "~")


def _read(chunk: bytes, schema: pa.Schema | None = None) -> pa.Table:
    options = pa_json.ReadOptions(block_size=len(chunk) + 1, use_threads=False)
    parse = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer")
    return pa_json.read_json(pa.BufferReader(chunk), read_options=options, parse_options=parse)


def _as_text_type(data_type: pa.DataType) -> pa.DataType:
    """`data_type` with every timestamp (pyarrow's guess for date-like strings) as string."""
    if pa.types.is_timestamp(data_type):
        return pa.string()
    if pa.types.is_list(data_type):
        return pa.list_(_as_text_type(data_type.value_type))
    if pa.types.is_struct(data_type):
        return pa.struct([field.with_type(_as_text_type(field.type)) for field in data_type])
    return data_type


def _text_dates(table: pa.Table, chunk: bytes) -> pa.Table:
    """`table`, parsed again with date-like columns as strings when pyarrow made timestamps."""
    text_schema = pa.schema([field.with_type(_as_text_type(field.type)) for field in table.schema])
    return table if text_schema.equals(table.schema) else _read(chunk, text_schema)


def _line_at(chunk: bytes, first_line: int, offset: int) -> int:
    return first_line + chunk.count(b"\n", 0, offset)


def _located(path: InputFile, first_line: int, chunk: bytes, message: str) -> InputError:
    row = _JSON_ROW.search(message)
    line = first_line
    if row:  # pyarrow counts rows within the chunk, skipping blank lines
        non_blank = [i for i, text in enumerate(chunk.split(b"\n")) if text.strip()]
        index = int(row.group(1))
        line = first_line + (non_blank[index] if index < len(non_blank) else 0)
        message = _JSON_ROW.sub("", message)
    return InputError(f"{path}: line {line}: {message}")


def _with_mixed_columns(path: InputFile, first_line: int, chunk: bytes, mixable: set[str],
                        aside: set[str]) -> pa.Table:
    """Parse a chunk whose values in the `aside` columns are not all of one type: each line
    with Python's json, those values set aside and replaced by "" for pyarrow, then put back as
    `MIXED_TEXT`; another `mixable` column that turns out to mix types too joins them."""
    rows: list[dict] = []
    for number, line in enumerate(chunk.split(b"\n"), start=first_line):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as error:
            raise InputError(f"{path}: line {number}: not valid JSON: "
                             f"{one_line(error, _MESSAGE_LIMIT)}") from None
    while True:
        lines = [json.dumps({key: "" if key in aside else value for key, value in row.items()},
                            ensure_ascii=False).encode() for row in rows]
        rewritten = b"\n".join(lines) + b"\n"
        try:
            table = _text_dates(_read(rewritten), rewritten)
            break
        except pa.ArrowException as error:
            message = one_line(error, _MESSAGE_LIMIT)
            changed = _changed_column(message)
            if changed not in mixable or changed in aside:
                raise _located(path, first_line, chunk, message) from None
            aside.add(changed)
    for name in sorted(aside):
        values = mixed_text_array([row.get(name) for row in rows])
        index = table.schema.get_field_index(name)
        table = table.set_column(index, pa.field(name, values.type), [values])
    return table
