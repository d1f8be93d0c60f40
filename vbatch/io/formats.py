"""Input file formats: each format's schema, its rows as Arrow batches, and cheap row counts.

Formats: Parquet (`.parquet`), JSON lines (`.jsonl`, `.ndjson`, `.json`), CSV (`.csv`) and
Arrow IPC (`.arrow`, as written by `datasets.save_to_disk`). Memory stays bounded: Parquet is
read row group by row group, CSV through pyarrow's streaming reader, JSON lines in chunks of
whole lines (about `BLOCK_SIZE` bytes each), Arrow through a memory map. A file is a local
`Path` or a `RemoteFile` (an object-store object, io/input_file.py): the same readers take
either, an object through its filesystem (random access for Parquet and Arrow, streams for
text).

CSV cells are text unless the job asks for inference (`--csv-infer-types`), so codes such as
zip `02134` survive. JSON lines (and inferred CSV) carry no schema, so pyarrow infers one per
block; `file_schema(..., exact=True)` reads a text file larger than one block in full to learn
the types of every block and refuses blocks that disagree (a column of ints for a million rows
that then holds "unknown") unless promotion is allowed (`--allow-type-promotion`).

Every problem with the data raises `InputError` with a one-line message naming the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from vbatch.errors import InputError, one_line
from vbatch.io.column_types import unify_input_schemas
from vbatch.io.csv_quoting import check_csv_quoting
from vbatch.io.input_file import InputFile, RemoteFile, arrow_input, file_size, open_input
from vbatch.io.jsonl import jsonl_tables
from vbatch.io.mixed_text import is_mixed_text
from vbatch.io.openai_batch import (
    OPENAI,
    is_openai_batch_schema,
    looks_like_openai_batch,
    openai_batch_batches,
    openai_batch_schema,
)
from vbatch.io.schema import MIXED_COLUMNS
from vbatch.io.text_lines import invalid_utf8_line

PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = (".csv",)
ARROW_SUFFIXES = (".arrow",)
SUPPORTED_SUFFIXES = PARQUET_SUFFIXES + JSONL_SUFFIXES + CSV_SUFFIXES + ARROW_SUFFIXES

#: Bytes of text parsed at a time; also the size up to which the first block is the whole file.
BLOCK_SIZE = 8 << 20

_CSV_CONVERSION_ERROR = re.compile(r"In CSV column #(\d+): CSV conversion error to (\w+)")
_MESSAGE_LIMIT = 300


@contextmanager
def input_errors(file: InputFile | str) -> Iterator[None]:
    """Turn pyarrow/OS errors raised while reading `file` into one-line InputErrors
    ("<file>: <message>"); InputErrors pass through unchanged. For an object-store file any
    error is one (its SDK raises its own types: no credentials, no connection, ...)."""
    try:
        yield
    except InputError:
        raise
    except (pa.ArrowException, OSError, ValueError, UnicodeError) as error:
        raise InputError(f"{file}: {one_line(error, _MESSAGE_LIMIT)}") from None
    except Exception as error:
        if not isinstance(file, RemoteFile):
            raise
        raise InputError(f"{file}: {type(error).__name__}: "
                         f"{one_line(error, _MESSAGE_LIMIT)}") from None


def _is_blank(path: InputFile) -> bool:
    """True when the file holds nothing but whitespace (and maybe a byte order mark)."""
    with open_input(path) as handle:
        while data := handle.read(1 << 16):
            if data.replace(b"\xef\xbb\xbf", b"").strip():
                return False
    return True


# --- CSV and Arrow ---------------------------------------------------------------------------


@contextmanager
def _open_csv(path: InputFile,
              column_types: dict[str, pa.DataType]) -> Iterator[pa_csv.CSVStreamingReader]:
    with arrow_input(path, seekable=False) as source, pa_csv.open_csv(
        source,
        read_options=pa_csv.ReadOptions(block_size=BLOCK_SIZE),
        parse_options=pa_csv.ParseOptions(newlines_in_values=True),  # multi-line prompts
        # An unquoted empty cell is null in every column (an empty per-row sampling cell keeps
        # the job's value); a quoted "" stays an empty string, and "NA" or "null" stay text.
        convert_options=pa_csv.ConvertOptions(column_types=column_types, null_values=[""],
                                              strings_can_be_null=True,
                                              quoted_strings_can_be_null=False),
    ) as reader:
        yield reader


def _read_all_csv(path: InputFile, column_types: dict[str, pa.DataType]) -> None:
    """Convert every block of `path` with `column_types` (raises where a value does not fit)."""
    with _open_csv(path, column_types) as reader:
        for _ in reader:
            pass


@contextmanager
def _parquet_file(path: InputFile) -> Iterator[pq.ParquetFile]:
    with arrow_input(path) as source, pq.ParquetFile(source) as parquet_file:
        yield parquet_file


@contextmanager
def _csv_utf8_errors(path: InputFile) -> Iterator[None]:
    """Name the line of the first invalid UTF-8 byte (pyarrow names none, or a row of a block)."""
    try:
        yield
    except pa.ArrowInvalid as error:
        line = invalid_utf8_line(path) if "UTF8" in str(error) else None
        if line is None:
            raise
        raise InputError(f"{path}: line {line}: invalid UTF8 data (the file must be UTF-8 "
                         "text)") from None


def _csv_schema(path: InputFile, *, text_columns: Sequence[str], exact: bool, infer_types: bool,
                allow_promotion: bool) -> pa.Schema:
    """Every column as string, or (`infer_types`) the types pyarrow infers from the first block
    with `text_columns` as strings. `exact`: a file larger than a block is read in full, so a
    later value that does not fit is refused now (or, with `allow_promotion`, widens its
    column), not found after the model loaded."""
    check_csv_quoting(path)
    with _open_csv(path, {name: pa.string() for name in text_columns}) as reader:
        schema = reader.schema
    if not infer_types:
        with _open_csv(path, {name: pa.string() for name in schema.names}) as reader:
            schema = reader.schema  # the first block, read as text: its UTF-8 is checked
    if not exact or file_size(path) <= BLOCK_SIZE or len(set(schema.names)) < len(schema):
        return schema
    if infer_types and allow_promotion:
        return _csv_schema_of_all_blocks(path, schema)
    try:
        _read_all_csv(path, {field.name: field.type for field in schema})
    except pa.ArrowInvalid as error:
        match = _CSV_CONVERSION_ERROR.search(str(error))
        if not match:
            raise
        field = schema.field(int(match.group(1)))
        raise InputError(
            f"{path}: column {field.name!r} is {field.type} in the file's first block but a "
            f"later value is not ({one_line(error, 120)}); pass --allow-type-promotion to "
            "widen the column, or leave out --csv-infer-types to read CSV cells as text"
        ) from None
    return schema


def _csv_schema_of_all_blocks(path: InputFile, first_block: pa.Schema) -> pa.Schema:
    """Stream the whole CSV, widening a column's type (int -> double -> string) whenever a later
    block holds values the first block's inferred type cannot convert."""
    types = {field.name: field.type for field in first_block}
    for _ in range(2 * len(types) + 1):
        try:
            _read_all_csv(path, types)
            break
        except pa.ArrowInvalid as error:
            match = _CSV_CONVERSION_ERROR.search(str(error))
            if not match or pa.types.is_string(types[first_block.names[int(match.group(1))]]):
                raise
            name = first_block.names[int(match.group(1))]
            types[name] = pa.float64() if pa.types.is_integer(types[name]) else pa.string()
    return pa.schema([(name, data_type) for name, data_type in types.items()])


def _open_arrow(path: InputFile) -> pa.NativeFile:
    """A local file memory-mapped, an object opened for random access."""
    if isinstance(path, RemoteFile):
        return path.arrow_fs.open_input_file(path.path)
    return pa.memory_map(str(path))


def _arrow_batches(path: InputFile) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    source = _open_arrow(path)
    try:
        reader = pa.ipc.open_stream(source)
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:
        source.close()
        reader = pa.ipc.open_file(_open_arrow(path))
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


# --- one file's schema and batches; row counts -----------------------------------------------


def detect_input_format(files: Sequence[InputFile], requested: str) -> str:
    """"rows" or "openai" (OpenAI batch files, io/openai_batch.py) for the job's `files`:
    `requested` unless "auto", then "openai" when every file is a JSON lines file that looks
    like one. Raises InputError when "openai" is asked of a file that is not JSON lines, or
    "auto" finds batch files and row files together."""
    if requested == "rows":
        return "rows"
    jsonl = [path for path in files if path.suffix.lower() in JSONL_SUFFIXES]
    if requested == OPENAI:
        other = next((path for path in files if path not in jsonl), None)
        if other is not None:
            raise InputError(f"{other}: --input-format openai reads JSON lines files "
                             f"(.jsonl), not {other.suffix or 'a file without a suffix'}")
        return OPENAI
    batch_files = []
    for path in jsonl:
        with input_errors(path):
            if looks_like_openai_batch(path):
                batch_files.append(path)
    if not batch_files:
        return "rows"
    other = next((path for path in files if path not in batch_files), None)
    if other is not None:
        raise InputError(f"{batch_files[0]} is an OpenAI batch file but {other} is not; run "
                         "them as separate jobs (or pass --input-format rows)")
    return OPENAI


def file_schema(path: InputFile, *, text_columns: Sequence[str], exact: bool,
                prompt_column: str | None = None, csv_infer_types: bool = False,
                allow_promotion: bool = False, input_format: str = "rows") -> pa.Schema | None:
    """The schema `file_batches` yields for `path`, or None for an empty text file.
    `input_format` "openai": the file is an OpenAI batch file (`OPENAI_BATCH_SCHEMA`).

    CSV cells are read as text unless `csv_infer_types`; then `text_columns` are still read as
    strings (never inferred as numbers). A JSON lines `prompt_column` whose values are not all
    text is `MIXED_TEXT` (io/mixed_text.py). `exact=False` looks at the first block only;
    `exact=True` reads large text files fully, refusing blocks whose types differ (see
    `unify_input_schemas`; `allow_promotion` promotes them). Raises InputError (one line,
    naming the file) on unreadable or malformed data.
    """
    if input_format == OPENAI:
        with input_errors(path):
            return openai_batch_schema(path)
    with input_errors(path), _csv_utf8_errors(path):
        schema = _read_file_schema(path, text_columns=text_columns, exact=exact,
                                   prompt_column=prompt_column, csv_infer_types=csv_infer_types,
                                   allow_promotion=allow_promotion)
        if schema is not None:
            schema.names  # noqa: B018 - raises UnicodeDecodeError for non-UTF-8 column names
    return schema


def _read_file_schema(path: InputFile, *, text_columns: Sequence[str], exact: bool,
                      prompt_column: str | None, csv_infer_types: bool,
                      allow_promotion: bool) -> pa.Schema | None:
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        with _parquet_file(path) as parquet_file:
            return parquet_file.schema_arrow
    if suffix in ARROW_SUFFIXES:
        return _arrow_batches(path)[0]
    if _is_blank(path):
        return None
    if suffix in CSV_SUFFIXES:
        return _csv_schema(path, text_columns=text_columns, exact=exact,
                           infer_types=csv_infer_types, allow_promotion=allow_promotion)
    first_only = not exact or file_size(path) <= BLOCK_SIZE
    tables = jsonl_tables(path, block_size=BLOCK_SIZE, prompt_column=prompt_column,
                          first_only=first_only)
    chunk_schemas = {f"{path} (lines from {line})": table.schema for line, table in tables}
    if not chunk_schemas:
        return None
    return unify_input_schemas(chunk_schemas, allow_promotion=allow_promotion)


def _mixed_text_column(schema: pa.Schema) -> str | None:
    """The prompt column that mixes types (the `MIXED_COLUMNS` may mix types in any file)."""
    return next((field.name for field in schema if is_mixed_text(field.type)
                 and field.name not in MIXED_COLUMNS), None)


def file_batches(path: InputFile, schema: pa.Schema, batch_size: int, *,
                 row_groups: Sequence[int] | None = None) -> Iterator[pa.RecordBatch]:
    """Yield `path`'s rows as batches with the file's own types: `schema` is what
    `file_schema(path, exact=True)` returned. Parquet batches hold at most `batch_size` rows;
    other formats yield their blocks as they come. `row_groups` (Parquet only): read just
    these row groups, in order. Raises InputError on malformed data."""
    suffix = path.suffix.lower()
    if row_groups is not None and (suffix not in PARQUET_SUFFIXES
                                   or is_openai_batch_schema(schema)):
        raise ValueError(f"{path}: row groups exist only in Parquet files")
    with input_errors(path), _csv_utf8_errors(path):
        if is_openai_batch_schema(schema):
            yield from openai_batch_batches(path, batch_size)
        elif suffix in PARQUET_SUFFIXES:
            with _parquet_file(path) as parquet_file:
                yield from parquet_file.iter_batches(batch_size=batch_size,
                                                     row_groups=row_groups)
        elif suffix in ARROW_SUFFIXES:
            yield from _arrow_batches(path)[1]
        elif suffix in CSV_SUFFIXES:
            with _open_csv(path, {field.name: field.type for field in schema}) as reader:
                for batch in reader:
                    batch.validate(full=True)
                    yield batch
        else:
            # The scan read every chunk: a prompt column that mixes types is MIXED_TEXT there.
            prompt_column = _mixed_text_column(schema)
            for _, table in jsonl_tables(path, block_size=BLOCK_SIZE,
                                         prompt_column=prompt_column):
                yield from table.to_batches()


def parquet_row_group_rows(path: InputFile) -> list[int] | None:
    """The row count of each row group of `path` (from its footer), or None when `path` is
    not a Parquet file. Raises InputError on an unreadable file."""
    if path.suffix.lower() not in PARQUET_SUFFIXES:
        return None
    with input_errors(path), _parquet_file(path) as parquet_file:
        metadata = parquet_file.metadata
        return [metadata.row_group(index).num_rows for index in range(metadata.num_row_groups)]


def count_rows(files: Sequence[InputFile]) -> int | None:
    """Total number of input rows when it is cheap to know (Parquet footers, Arrow files),
    None when a text file would have to be read in full. Raises InputError on unreadable files."""
    total = 0
    for path in files:
        suffix = path.suffix.lower()
        with input_errors(path):
            if suffix in PARQUET_SUFFIXES:
                with _parquet_file(path) as parquet_file:
                    total += parquet_file.metadata.num_rows
            elif suffix in ARROW_SUFFIXES:
                total += sum(batch.num_rows for batch in _arrow_batches(path)[1])
            else:
                return None
    return total
