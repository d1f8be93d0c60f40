"""Input files -> a stream of Arrow record batches with one schema and a row key per row.

Formats: Parquet (`.parquet`), JSON lines (`.jsonl`, `.ndjson`, `.json`), CSV (`.csv`) and
Arrow IPC (`.arrow`, as written by `datasets.save_to_disk`). Memory stays bounded: Parquet is
read row group by row group, CSV through pyarrow's streaming reader, JSON lines in chunks of
whole lines (about `BLOCK_SIZE` bytes each), Arrow through a memory map.

Text formats carry no schema, so pyarrow infers one from the first block. When a text file is
larger than one block, `input_schema` scans it once more to learn the types of every block
(e.g. a CSV column that is all ints for a million rows and then holds "unknown"); `validate_inputs`
only looks at the first block so that a job fails fast, before any model is loaded.

Every problem with the data raises `InputError` with a one-line message naming the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from vbatch.errors import InputError
from vbatch.io.csv_quoting import check_csv_quoting
from vbatch.io.positions import POSITION_COLUMN, IntervalSet, position_array
from vbatch.io.inputs import (ARROW_SUFFIXES, CSV_SUFFIXES, JSONL_SUFFIXES, PARQUET_SUFFIXES,
                              SUPPORTED_SUFFIXES, input_root, resolve_input_files)

# Finding files lives in inputs.py; these names stay importable from here too.
__all__ = ["JSONL_SUFFIXES", "SUPPORTED_SUFFIXES", "InputScan", "count_rows", "input_root",
           "input_schema", "prompt_column_of", "read_batches", "resolve_input_files",
           "scan_inputs", "validate_inputs"]
from vbatch.io.schema import check_input_schema, conform_batch, unify_input_schemas

#: Bytes of text parsed at a time; also the size up to which the first block is the whole file.
BLOCK_SIZE = 8 << 20

_CSV_CONVERSION_ERROR = re.compile(r"In CSV column #(\d+): CSV conversion error to (\w+)")
_JSON_ROW = re.compile(r" in row (\d+)")
# A line must be one JSON object. This also keeps a top-level `null` away from pyarrow's JSON
# reader, which crashes (segfault, pyarrow 26) when a block starts with one.
_LINE_NOT_AN_OBJECT = re.compile(rb"^[ \t\r]*[^{ \t\r\n]|[^} \t\r\n][ \t\r]*$", re.MULTILINE)


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def _input_errors(file: Path | str) -> Iterator[None]:
    """Turn pyarrow/OS errors raised while reading `file` into one-line InputErrors."""
    try:
        yield
    except InputError:
        raise
    except (pa.ArrowException, OSError, ValueError, UnicodeError) as error:
        raise InputError(f"{file}: {_one_line(error)}") from None


# --- per-format schema and batches ----------------------------------------------------------


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
        message = _one_line(error)
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


def _file_schema(path: Path, *, text_columns: Sequence[str], exact: bool) -> pa.Schema | None:
    """The schema `_file_batches` yields for `path`, or None for an empty text file.

    `exact=False` looks at the first block only; `exact=True` reads large text files fully.
    """
    with _input_errors(path):
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


def _file_batches(path: Path, schema: pa.Schema, batch_size: int) -> Iterator[pa.RecordBatch]:
    """Yield `path`'s rows as batches with the file's own types (see `_file_schema`)."""
    suffix = path.suffix.lower()
    with _input_errors(path):
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


# --- public reading API ---------------------------------------------------------------------


def _scan(
    files: Sequence[Path], prompt_column: str, id_column: str, *, exact: bool
) -> tuple[dict[Path, pa.Schema | None], pa.Schema]:
    """Check every file's schema; return each file's own schema and the unified batch schema."""
    if not files:
        raise InputError("no input files")
    file_schemas = {
        path: _file_schema(path, text_columns=(prompt_column, id_column), exact=exact)
        for path in files
    }
    prompt_sources: dict[str, str] = {}
    keyed_schemas: dict[str, pa.Schema] = {}
    for path, schema in file_schemas.items():
        if schema is None:
            continue  # an empty text file adds no rows and no columns
        prompt_sources[str(path)] = check_input_schema(
            schema, prompt_column=prompt_column, file=str(path)
        )
        if id_column not in schema.names:
            schema = pa.schema([pa.field(id_column, pa.string()), *schema])
        keyed_schemas[str(path)] = schema
    if not keyed_schemas:
        raise InputError(f"{files[0]}: the input is empty (no rows, no columns)")
    (first_file, first_source), *others = prompt_sources.items()
    for file, source in others:
        if source != first_source:
            raise InputError(
                f"{file}: prompts are in column {source!r} but {first_file} has them in "
                f"{first_source!r}; use the same column in every file"
            )
    return file_schemas, unify_input_schemas(keyed_schemas)


def validate_inputs(
    files: Sequence[Path], prompt_column: str = "prompt", *, id_column: str = "id"
) -> None:
    """Fail fast, before any model is loaded: check that every file is readable, holds the
    prompt column (or `messages`) and that all files' schemas can be unified. Cheap: reads
    Parquet/Arrow footers and the first block of each text file. Raises InputError."""
    _scan(list(files), prompt_column, id_column, exact=False)


@dataclass(frozen=True)
class InputScan:
    """The result of scanning the input files once: each file's own schema (None for an empty
    text file) and the unified `schema` every batch of `read_batches` has."""

    file_schemas: dict[Path, pa.Schema | None]
    schema: pa.Schema


def scan_inputs(
    files: Sequence[Path], *, prompt_column: str = "prompt", id_column: str = "id"
) -> InputScan:
    """Learn every file's schema (reading large text files fully for their types) and unify
    them. Pass the result to `read_batches(scan=...)` so the files are not scanned twice.
    Raises InputError."""
    return InputScan(*_scan(list(files), prompt_column, id_column, exact=True))


def input_schema(
    files: Sequence[Path], *, prompt_column: str = "prompt", id_column: str = "id"
) -> pa.Schema:
    """The schema of every batch `read_batches` yields for these files (input columns plus the
    row-key column). Reads large text files fully to learn their types. Raises InputError."""
    return scan_inputs(files, prompt_column=prompt_column, id_column=id_column).schema


def prompt_column_of(schema: pa.Schema, prompt_column: str = "prompt") -> str:
    """The column holding the prompts in batches of `schema`: `prompt_column` when present,
    else `"messages"` (chat turns). Raises InputError when there is neither."""
    return check_input_schema(schema, prompt_column=prompt_column, file="input")


def count_rows(files: Sequence[Path]) -> int | None:
    """Total number of input rows when it is cheap to know (Parquet footers, Arrow files),
    None when a text file would have to be read in full. Raises InputError on unreadable files."""
    total = 0
    for path in files:
        suffix = path.suffix.lower()
        with _input_errors(path):
            if suffix in PARQUET_SUFFIXES:
                with pq.ParquetFile(path) as parquet_file:
                    total += parquet_file.metadata.num_rows
            elif suffix in ARROW_SUFFIXES:
                total += sum(batch.num_rows for batch in _arrow_batches(path)[1])
            else:
                return None
    return total


def _rebatch(batches: Iterable[pa.RecordBatch], batch_size: int) -> Iterator[pa.RecordBatch]:
    """Regroup same-schema batches into batches of exactly `batch_size` rows (the last: fewer)."""
    pending: list[pa.RecordBatch] = []
    num_pending = 0
    for batch in batches:
        pending.append(batch)
        num_pending += batch.num_rows
        if num_pending >= batch_size:
            table = pa.Table.from_batches(pending).combine_chunks()
            num_full = num_pending - num_pending % batch_size
            yield from table.slice(0, num_full).to_batches(max_chunksize=batch_size)
            pending = table.slice(num_full).to_batches()
            num_pending -= num_full
    if num_pending:
        table = pa.Table.from_batches(pending).combine_chunks()
        yield from table.to_batches(max_chunksize=batch_size)


def _keyed_batches(
    path: Path,
    file_schema: pa.Schema,
    schema: pa.Schema,
    *,
    id_column: str,
    key_prefix: str,
    batch_size: int,
    file_index: int | None = None,
    skip: IntervalSet | None = None,
) -> Iterator[pa.RecordBatch]:
    """`path`'s batches with row keys added (when it has no `id_column`), cast to `schema`;
    with a `file_index`, a last column `POSITION_COLUMN` of row positions, and the rows whose
    positions are in `skip` left out."""
    needs_keys = id_column not in file_schema.names
    num_rows_read = 0
    for batch in _file_batches(path, file_schema, batch_size):
        if needs_keys:
            rows = range(num_rows_read, num_rows_read + batch.num_rows)
            keys = pa.array([f"{key_prefix}:{row}" for row in rows], type=pa.string())
            key_schema = pa.schema([pa.field(id_column, pa.string()), *batch.schema])
            batch = pa.RecordBatch.from_arrays([keys, *batch.columns], schema=key_schema)
        first_row = num_rows_read
        num_rows_read += batch.num_rows
        batch = conform_batch(batch, schema, file=str(path))
        if file_index is not None:
            positions = position_array(file_index, first_row, batch.num_rows)
            batch = batch.append_column(pa.field(POSITION_COLUMN, pa.int64()), positions)
            if skip is not None and len(skip):
                keep = ~skip.contains(positions.to_numpy())
                if not keep.all():
                    batch = batch.filter(pa.array(keep))
        if batch.num_rows:
            yield batch


def read_batches(
    files: Sequence[Path],
    *,
    batch_size: int = 1024,
    prompt_column: str = "prompt",
    id_column: str = "id",
    root: str | os.PathLike[str] | None = None,
    scan: InputScan | None = None,
    with_positions: bool = False,
    skip: IntervalSet | None = None,
    first_file_index: int = 0,
) -> Iterator[pa.RecordBatch]:
    """Stream all rows of `files` (in order) as record batches of at most `batch_size` rows.

    Every batch has the schema `input_schema(files, ...)`: the input columns unchanged (types
    unified across files) plus the row key. When a file has no `id_column`, a string column of
    that name (first) holds `"<file path relative to root>:<0-based row in file>"`, stable
    across reruns; `root` defaults to the deepest directory holding all files (pass
    `input_root(INPUT)` so keys do not change when files are added). Each file's schema is
    checked before any of its rows are yielded; a batch never spans two files. Raises
    InputError (one line, naming the file and line where known) on bad input. `scan`: the
    `scan_inputs` result for these same files and columns, if the caller already has it.

    `with_positions`: add the hidden int64 column `POSITION_COLUMN` (io/positions.py; file
    i of `files` counts as input file `first_file_index + i`) and leave out the rows whose
    positions are in `skip` (the rows a resumed job already committed).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    files = list(files)
    if scan is None:
        scan = scan_inputs(files, prompt_column=prompt_column, id_column=id_column)
    file_schemas, schema = scan.file_schemas, scan.schema
    if root is None:
        root = os.path.commonpath([os.path.abspath(path.parent) for path in files])
    root_dir = os.path.abspath(root)
    for index, (path, file_schema) in enumerate(file_schemas.items()):
        if file_schema is None:
            continue
        key_prefix = Path(os.path.relpath(os.path.abspath(path), root_dir)).as_posix()
        batches = _keyed_batches(
            path,
            file_schema,
            schema,
            id_column=id_column,
            key_prefix=key_prefix,
            batch_size=batch_size,
            file_index=first_file_index + index if with_positions else None,
            skip=skip,
        )
        yield from _rebatch(batches, batch_size)
