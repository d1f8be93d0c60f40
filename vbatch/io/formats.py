"""Input file formats: each format's schema, its rows as Arrow batches, and cheap row counts.

Formats: Parquet (`.parquet`), JSON lines (`.jsonl`, `.ndjson`, `.json`), CSV (`.csv`) and
Arrow IPC (`.arrow`, as written by `datasets.save_to_disk`). Memory stays bounded: Parquet is
read row group by row group, CSV through pyarrow's streaming reader, JSON lines in chunks of
whole lines (about `BLOCK_SIZE` bytes each), Arrow through a memory map.

Text formats carry no schema, so pyarrow infers one from the first block. `file_schema(...,
exact=True)` reads a text file larger than one block in full to learn the types of every block
(e.g. a CSV column that is all ints for a million rows and then holds "unknown").

Every problem with the data raises `InputError` with a one-line message naming the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from vbatch.errors import InputError, one_line
from vbatch.io.csv_quoting import check_csv_quoting
from vbatch.io.schema import unify_input_schemas

PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = (".csv",)
ARROW_SUFFIXES = (".arrow",)
SUPPORTED_SUFFIXES = PARQUET_SUFFIXES + JSONL_SUFFIXES + CSV_SUFFIXES + ARROW_SUFFIXES

#: Bytes of text parsed at a time; also the size up to which the first block is the whole file.
BLOCK_SIZE = 8 << 20

_CSV_CONVERSION_ERROR = re.compile(r"In CSV column #(\d+): CSV conversion error to (\w+)")
_JSON_ROW = re.compile(r" in row (\d+)")
# A line must be one JSON object. This also keeps a top-level `null` away from pyarrow's JSON
# reader, which crashes (segfault, pyarrow 26) when a block starts with one.
_LINE_NOT_AN_OBJECT = re.compile(rb"^[ \t\r]*[^{ \t\r\n]|[^} \t\r\n][ \t\r]*$", re.MULTILINE)
_MESSAGE_LIMIT = 300


@contextmanager
def input_errors(file: Path | str) -> Iterator[None]:
    """Turn pyarrow/OS errors raised while reading `file` into one-line InputErrors
    ("<file>: <message>"); InputErrors pass through unchanged."""
    try:
        yield
    except InputError:
        raise
    except (pa.ArrowException, OSError, ValueError, UnicodeError) as error:
        raise InputError(f"{file}: {one_line(error, _MESSAGE_LIMIT)}") from None


# --- JSON lines ------------------------------------------------------------------------------


def _is_blank(path: Path) -> bool:
    """True when the file holds nothing but whitespace (and maybe a byte order mark)."""
    with open(path, "rb") as handle:
        while data := handle.read(1 << 16):
            if data.replace(b"\xef\xbb\xbf", b"").strip():
                return False
    return True


def _jsonl_chunks(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (number of the chunk's first line, whole lines) of about BLOCK_SIZE bytes each.

    The last chunk runs to the end of the file, a last line without a newline included, so a
    file of at most BLOCK_SIZE bytes is exactly one chunk (a truncated last line is in it)."""
    with open(path, "rb") as handle:
        pending, line_number = b"", 1
        data = handle.read(BLOCK_SIZE)
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]  # UTF-8 byte order mark
        while data:
            following = handle.read(BLOCK_SIZE)
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


def _parse_jsonl_chunk(path: Path, first_line: int, chunk: bytes) -> pa.Table | None:
    if not chunk.strip():
        return None
    if first_line == 1 and chunk.lstrip().startswith(b"["):
        raise InputError(f"{path}: holds a JSON array; vbatch reads JSON lines (an object a line)")
    not_an_object = _LINE_NOT_AN_OBJECT.search(chunk)
    if not_an_object:
        line = first_line + chunk.count(b"\n", 0, not_an_object.start())
        raise InputError(f"{path}: line {line}: not a JSON object (one {{...}} per line expected)")
    options = pa_json.ReadOptions(block_size=len(chunk) + 1, use_threads=False)
    try:
        table = pa_json.read_json(pa.BufferReader(chunk), read_options=options)
        table.validate(full=True)  # the JSON reader does not check UTF-8
        return table
    except pa.ArrowException as error:
        message = one_line(error, _MESSAGE_LIMIT)
        row = _JSON_ROW.search(message)
        line = first_line
        if row:  # pyarrow counts rows within the chunk, skipping blank lines
            non_blank = [i for i, text in enumerate(chunk.split(b"\n")) if text.strip()]
            index = int(row.group(1))
            line = first_line + (non_blank[index] if index < len(non_blank) else 0)
            message = _JSON_ROW.sub("", message)
        raise InputError(f"{path}: line {line}: {message}") from None


def _jsonl_tables(path: Path, *, first_only: bool = False) -> Iterator[pa.Table]:
    for first_line, chunk in _jsonl_chunks(path):
        table = _parse_jsonl_chunk(path, first_line, chunk)
        if table is not None:
            yield table
            if first_only:
                return


# --- CSV and Arrow ---------------------------------------------------------------------------


def _open_csv(path: Path, column_types: dict[str, pa.DataType]) -> pa_csv.CSVStreamingReader:
    return pa_csv.open_csv(
        path,
        read_options=pa_csv.ReadOptions(block_size=BLOCK_SIZE),
        parse_options=pa_csv.ParseOptions(newlines_in_values=True),  # multi-line prompts
        convert_options=pa_csv.ConvertOptions(column_types=column_types),
    )


def _csv_schema_of_all_blocks(path: Path, first_block: pa.Schema) -> pa.Schema:
    """Stream the whole CSV, widening a column's type (int -> double -> string) whenever a later
    block holds values the first block's inferred type cannot convert."""
    types = {field.name: field.type for field in first_block}
    for _ in range(2 * len(types) + 1):
        try:
            for _ in _open_csv(path, types):
                pass
            break
        except pa.ArrowInvalid as error:
            match = _CSV_CONVERSION_ERROR.search(str(error))
            if not match or pa.types.is_string(types[first_block.names[int(match.group(1))]]):
                raise
            name = first_block.names[int(match.group(1))]
            types[name] = pa.float64() if pa.types.is_integer(types[name]) else pa.string()
    return pa.schema([(name, data_type) for name, data_type in types.items()])


def _arrow_batches(path: Path) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_stream(source)
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


# --- one file's schema and batches; row counts -----------------------------------------------


def file_schema(path: Path, *, text_columns: Sequence[str], exact: bool) -> pa.Schema | None:
    """The schema `file_batches` yields for `path`, or None for an empty text file.

    `text_columns` are read as strings from CSV files (never inferred as numbers).
    `exact=False` looks at the first block only; `exact=True` reads large text files fully.
    Raises InputError (one line, naming the file) on unreadable or malformed data.
    """
    with input_errors(path):
        schema = _read_file_schema(path, text_columns=text_columns, exact=exact)
        if schema is not None:
            schema.names  # noqa: B018 - raises UnicodeDecodeError for non-UTF-8 column names
    return schema


def _read_file_schema(
    path: Path, *, text_columns: Sequence[str], exact: bool
) -> pa.Schema | None:
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        with pq.ParquetFile(path) as parquet_file:
            return parquet_file.schema_arrow
    if suffix in ARROW_SUFFIXES:
        return _arrow_batches(path)[0]
    if _is_blank(path):
        return None
    is_one_block = path.stat().st_size <= BLOCK_SIZE
    if suffix in CSV_SUFFIXES:
        check_csv_quoting(path)
        with _open_csv(path, {name: pa.string() for name in text_columns}) as reader:
            first_block = reader.schema
        if not exact or is_one_block or len(set(first_block.names)) < len(first_block):
            return first_block
        return _csv_schema_of_all_blocks(path, first_block)
    tables = _jsonl_tables(path, first_only=not exact or is_one_block)
    chunk_schemas = {f"{path} (chunk {i})": table.schema for i, table in enumerate(tables)}
    return unify_input_schemas(chunk_schemas) if chunk_schemas else None


def file_batches(path: Path, schema: pa.Schema, batch_size: int) -> Iterator[pa.RecordBatch]:
    """Yield `path`'s rows as batches with the file's own types: `schema` is what
    `file_schema(path, exact=True)` returned. Parquet batches hold at most `batch_size` rows;
    other formats yield their blocks as they come. Raises InputError on malformed data."""
    suffix = path.suffix.lower()
    with input_errors(path):
        if suffix in PARQUET_SUFFIXES:
            with pq.ParquetFile(path) as parquet_file:
                yield from parquet_file.iter_batches(batch_size=batch_size)
        elif suffix in ARROW_SUFFIXES:
            yield from _arrow_batches(path)[1]
        elif suffix in CSV_SUFFIXES:
            with _open_csv(path, {field.name: field.type for field in schema}) as reader:
                for batch in reader:
                    batch.validate(full=True)
                    yield batch
        else:
            for table in _jsonl_tables(path):
                yield from table.to_batches()


def count_rows(files: Sequence[Path]) -> int | None:
    """Total number of input rows when it is cheap to know (Parquet footers, Arrow files),
    None when a text file would have to be read in full. Raises InputError on unreadable files."""
    total = 0
    for path in files:
        suffix = path.suffix.lower()
        with input_errors(path):
            if suffix in PARQUET_SUFFIXES:
                with pq.ParquetFile(path) as parquet_file:
                    total += parquet_file.metadata.num_rows
            elif suffix in ARROW_SUFFIXES:
                total += sum(batch.num_rows for batch in _arrow_batches(path)[1])
            else:
                return None
    return total
