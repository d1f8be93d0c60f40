"""Input files -> a stream of Arrow record batches with one schema and a row key per row.

Scanning: `scan_inputs` learns every file's schema (io/formats.py; large text files are read
in full for their types) and unifies them into the one schema every batch has;
`validate_inputs` only looks at the first block of each text file so that a job fails fast,
before any model is loaded. Reading: `read_batches` streams the files in order, adds the row
key (and, when asked, row positions, io/positions.py) and regroups the rows into batches of
`batch_size`.

Every problem with the data raises `InputError` with a one-line message naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa

from vbatch.errors import InputError
from vbatch.io import formats
from vbatch.io.column_types import conform_batch, unify_input_schemas
from vbatch.io.input_file import InputFile, default_root, row_key_prefix
from vbatch.io.openai_batch import BODY, OPENAI, is_openai_batch_schema
from vbatch.io.positions import POSITION_COLUMN, IntervalSet, position_array
from vbatch.io.schema import check_input_schema


def _scan(
    files: Sequence[InputFile], prompt_column: str, id_column: str, *, exact: bool,
    csv_infer_types: bool, allow_type_promotion: bool, input_format: str = "rows",
) -> tuple[dict[InputFile, pa.Schema | None], pa.Schema]:
    """Check every file's schema; return each file's own schema and the unified batch schema.
    `input_format` "openai": the files are OpenAI batch files (their prompts: `body`)."""
    if not files:
        raise InputError("no input files")
    file_schemas = {
        path: formats.file_schema(path, text_columns=(prompt_column, id_column), exact=exact,
                                  prompt_column=prompt_column, csv_infer_types=csv_infer_types,
                                  allow_promotion=allow_type_promotion,
                                  input_format=input_format)
        for path in files
    }
    prompt_sources: dict[str, str] = {}
    keyed_schemas: dict[str, pa.Schema] = {}
    for path, schema in file_schemas.items():
        if schema is None:
            continue  # an empty text file adds no rows and no columns
        prompt_sources[str(path)] = BODY if is_openai_batch_schema(schema) else \
            check_input_schema(schema, prompt_column=prompt_column, file=str(path))
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
    return file_schemas, unify_input_schemas(keyed_schemas, allow_promotion=allow_type_promotion)


def validate_inputs(
    files: Sequence[InputFile], prompt_column: str = "prompt", *, id_column: str = "id",
    csv_infer_types: bool = False, allow_type_promotion: bool = False,
    input_format: str = "rows",
) -> None:
    """Fail fast, before any model is loaded: check that every file is readable, holds the
    prompt column (or `messages`) and that all files' schemas can be unified (see
    `scan_inputs` for the two options). Cheap: reads Parquet/Arrow footers and the first block
    of each text file. Raises InputError."""
    _scan(list(files), prompt_column, id_column, exact=False, csv_infer_types=csv_infer_types,
          allow_type_promotion=allow_type_promotion, input_format=input_format)


@dataclass(frozen=True)
class InputScan:
    """The result of scanning the input files once: each file's own schema (None for an empty
    text file) and the unified `schema` every batch of `read_batches` has."""

    file_schemas: dict[InputFile, pa.Schema | None]
    schema: pa.Schema

    @property
    def input_format(self) -> str:
        """"openai" when the files are OpenAI batch files (io/openai_batch.py), else "rows"."""
        schemas = [schema for schema in self.file_schemas.values() if schema is not None]
        return OPENAI if schemas and all(map(is_openai_batch_schema, schemas)) else "rows"


def scan_inputs(
    files: Sequence[InputFile], *, prompt_column: str = "prompt", id_column: str = "id",
    csv_infer_types: bool = False, allow_type_promotion: bool = False,
    input_format: str = "rows",
) -> InputScan:
    """Learn every file's schema (reading large text files fully for their types) and unify
    them. Pass the result to `read_batches(scan=...)` so the files are not scanned twice.

    CSV cells are read as text unless `csv_infer_types`. A column whose type differs between
    files (or blocks of one text file) is refused unless the difference loses nothing
    (`unify_input_schemas`) or `allow_type_promotion`. `input_format` "openai": OpenAI batch
    files (io/openai_batch.py; see `formats.detect_input_format`). Raises InputError."""
    return InputScan(*_scan(list(files), prompt_column, id_column, exact=True,
                            csv_infer_types=csv_infer_types,
                            allow_type_promotion=allow_type_promotion,
                            input_format=input_format))


def input_schema(
    files: Sequence[InputFile], *, prompt_column: str = "prompt", id_column: str = "id"
) -> pa.Schema:
    """The schema of every batch `read_batches` yields for these files (input columns plus the
    row-key column). Reads large text files fully to learn their types. Raises InputError."""
    return scan_inputs(files, prompt_column=prompt_column, id_column=id_column).schema


def prompt_column_of(schema: pa.Schema, prompt_column: str = "prompt") -> str:
    """The column holding the prompts in batches of `schema`: `prompt_column` when present,
    else `"messages"` (chat turns). Raises InputError when there is neither."""
    return check_input_schema(schema, prompt_column=prompt_column, file="input")


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
    path: InputFile,
    file_schema: pa.Schema,
    schema: pa.Schema,
    *,
    id_column: str,
    key_prefix: str,
    batch_size: int,
    file_index: int | None = None,
    skip: IntervalSet | None = None,
    row_groups: Sequence[int] | None = None,
    first_row: int = 0,
) -> Iterator[pa.RecordBatch]:
    """`path`'s batches with row keys added (when it has no `id_column`), cast to `schema`;
    with a `file_index`, a last column `POSITION_COLUMN` of row positions, and the rows whose
    positions are in `skip` left out. `row_groups` (Parquet): only those, whose first row is
    row `first_row` of the file (keys and positions count from there)."""
    needs_keys = id_column not in file_schema.names
    num_rows_read = first_row
    for batch in formats.file_batches(path, file_schema, batch_size, row_groups=row_groups):
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
    files: Sequence[InputFile],
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
    `input_root(INPUT)` so keys do not change when files are added; for objects in a store,
    `root` is a prefix URI). Each file's schema is
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
        root = default_root(files)
    for index, (path, file_schema) in enumerate(file_schemas.items()):
        if file_schema is None:
            continue
        key_prefix = row_key_prefix(path, root)
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


def read_row_groups(
    path: InputFile,
    row_groups: Sequence[int],
    first_row: int,
    *,
    scan: InputScan,
    file_index: int,
    batch_size: int = 1024,
    id_column: str = "id",
    root: str | os.PathLike[str],
    skip: IntervalSet | None = None,
) -> Iterator[pa.RecordBatch]:
    """The rows of consecutive row groups `row_groups` of the Parquet file `path` (the
    `file_index`-th input file of `scan`), whose first row is row `first_row` of the file, as
    `read_batches(..., with_positions=True, skip=skip)` yields them for the whole file: the
    same schema, row keys and positions, so a file split over several readers gives exactly
    the rows of one read. Raises InputError on bad input."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    file_schema = scan.file_schemas[path]
    batches = _keyed_batches(path, file_schema, scan.schema, id_column=id_column,
                             key_prefix=row_key_prefix(path, root), batch_size=batch_size,
                             file_index=file_index, skip=skip, row_groups=list(row_groups),
                             first_row=first_row)
    yield from _rebatch(batches, batch_size)
