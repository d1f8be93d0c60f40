"""Column names and Arrow schemas of the tables vbatch reads and writes.

Input rules: every input file holds the prompt column (plain text, name set by
`--prompt-column`) or a `messages` column (a list of {role, content} chat turns). How the
files' column types combine into one schema is io/column_types.py.

Output rows are the input row (all its columns, the row key `id` included) followed by the
generation columns in `OUTPUT_FIELDS`. A row that could not be generated (empty prompt, prompt
too long, bad per-row sampling value, ...) has `error` set ("<code>: <message>") and every other
generation column null; a generated row has `error` null.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from vbatch.errors import InputError
from vbatch.io.column_types import decoded_type, is_plain_text
from vbatch.io.column_types import show as _show
from vbatch.io.mixed_text import as_text, is_mixed_text

MESSAGES_COLUMN = "messages"
GENERATED_TEXT = "generated_text"
FINISH_REASON = "finish_reason"
NUM_PROMPT_TOKENS = "num_prompt_tokens"
NUM_GENERATED_TOKENS = "num_generated_tokens"
ERROR = "error"

#: Columns vbatch appends to every input row, in order.
OUTPUT_FIELDS: tuple[pa.Field, ...] = (
    pa.field(GENERATED_TEXT, pa.string()),
    pa.field(FINISH_REASON, pa.string()),
    pa.field(NUM_PROMPT_TOKENS, pa.int32()),
    pa.field(NUM_GENERATED_TOKENS, pa.int32()),
    pa.field(ERROR, pa.string()),
)
OUTPUT_COLUMNS: tuple[str, ...] = tuple(field.name for field in OUTPUT_FIELDS)
#: "stop": the model ended the text (EOS or a stop string); "length": max_tokens was reached.
FINISH_REASONS: tuple[str, ...] = ("stop", "length")


def _is_text(data_type: pa.DataType) -> bool:
    data_type = decoded_type(data_type)
    return is_plain_text(data_type) or is_mixed_text(data_type)


def _is_chat(data_type: pa.DataType) -> bool:
    if pa.types.is_null(data_type):
        return True
    if not (pa.types.is_list(data_type) or pa.types.is_large_list(data_type)):
        return False
    turn = data_type.value_type
    if pa.types.is_null(turn):
        return True  # every list is empty: `empty_prompt` rows
    if not pa.types.is_struct(turn):
        return False
    names = {turn.field(i).name for i in range(turn.num_fields)}
    return {"role", "content"} <= names


def check_input_schema(schema: pa.Schema, *, prompt_column: str, file: str) -> str:
    """Check one input file's schema and return the column that holds its prompts.

    Returns `prompt_column` when present (it must hold text), else `"messages"` (it must be a
    list of {role, content} structs). Raises InputError (one line, naming `file`) when neither
    exists, when column names repeat, or when a column already uses an output column name.
    """
    names = schema.names
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"{file}: column name {repeated[0]!r} appears more than once")
    clashing = [name for name in OUTPUT_COLUMNS if name in names]
    if clashing:
        raise InputError(
            f"{file}: input column {clashing[0]!r} has the name of a column vbatch writes "
            f"({', '.join(OUTPUT_COLUMNS)}); rename it in the input"
        )
    if prompt_column in names:
        data_type = schema.field(prompt_column).type
        if not _is_text(data_type):
            raise InputError(
                f"{file}: column {prompt_column!r} must hold text, not {_show(data_type)}"
            )
        return prompt_column
    if MESSAGES_COLUMN in names:
        data_type = schema.field(MESSAGES_COLUMN).type
        if not _is_chat(data_type):
            raise InputError(
                f"{file}: column {MESSAGES_COLUMN!r} must be a list of {{role, content}} "
                f"objects, not {_show(data_type)}"
            )
        return MESSAGES_COLUMN
    shown = ", ".join(_show(name) for name in names) if names else "none"
    raise InputError(
        f"{file}: no column {prompt_column!r} (columns: {shown}); pass --prompt-column"
    )


def output_schema(input_schema: pa.Schema) -> pa.Schema:
    """Schema of output rows: the input columns, then `OUTPUT_FIELDS`. A `MIXED_TEXT` column
    (io/mixed_text.py) is written as strings.

    Raises InputError when an input column already uses an output column name.
    """
    clashing = [name for name in OUTPUT_COLUMNS if name in input_schema.names]
    if clashing:
        raise InputError(
            f"input column {clashing[0]!r} has the name of a column vbatch writes "
            f"({', '.join(OUTPUT_COLUMNS)}); rename it in the input"
        )
    fields = [field.with_type(pa.string()) if is_mixed_text(field.type) else field
              for field in input_schema]
    return pa.schema(fields + list(OUTPUT_FIELDS))


def build_output_batch(input_batch: pa.RecordBatch, results: Sequence[dict]) -> pa.RecordBatch:
    """Append the generation results to `input_batch`, row for row.

    `results[i]` belongs to row i. A generated row has the keys generated_text (str),
    finish_reason ("stop" or "length"), num_prompt_tokens and num_generated_tokens (ints), and
    optionally error=None. An error row has `error` (a non-empty "<code>: <message>" string)
    and no other key, or those keys set to None; its generation columns are written as nulls.
    Returns a batch with schema `output_schema(input_batch.schema)`. Raises InputError on a
    column-name clash and ValueError when results do not match the batch (a bug in the caller,
    not in the data).
    """
    schema = output_schema(input_batch.schema)
    if len(results) != input_batch.num_rows:
        raise ValueError(f"got {len(results)} results for a batch of {input_batch.num_rows} rows")
    for row, result in enumerate(results):
        error = result.get(ERROR)
        if error is not None:
            if not isinstance(error, str) or not error:
                raise ValueError(f"row {row}: error must be a non-empty string, got {error!r}")
            filled = [name for name in OUTPUT_COLUMNS if name != ERROR
                      and result.get(name) is not None]
            if filled:
                raise ValueError(f"row {row}: an error row must not set {filled[0]!r}")
        elif result[FINISH_REASON] not in FINISH_REASONS:
            raise ValueError(
                f"row {row}: finish_reason {result[FINISH_REASON]!r} not in {FINISH_REASONS}"
            )
    generated = [
        pa.array([result.get(field.name) for result in results], type=field.type)
        for field in OUTPUT_FIELDS
    ]
    inputs = [as_text(column) if is_mixed_text(column.type) else column
              for column in input_batch.columns]
    return pa.RecordBatch.from_arrays(inputs + generated, schema=schema)
