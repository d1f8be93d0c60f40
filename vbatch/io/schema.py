"""Column names and Arrow schemas of the tables vbatch reads and writes.

Input rules: every input file holds the prompt column (plain text, name set by
`--prompt-column`), else a `messages` column (a list of {role, content} chat turns), else a
`prompt_token_ids` column (a list of token ids, the prompt as vLLM's TokensPrompt; also by
`--prompt-column prompt_token_ids`). How the files' column types combine into one schema is
io/column_types.py. Integer `logprobs` / `prompt_logprobs` input columns are per-row requests
(`REQUEST_COLUMNS`): they are not passed through, the output column of that name takes their
place.

Output rows are the input row (all its columns, the row key `id` included) followed by the
generation columns in `OUTPUT_FIELDS`. A row that could not be generated (empty prompt, prompt
too long, bad per-row sampling value, ...) has `error` set ("<code>: <message>") and every other
generation column null; a generated row has `error` null.

Columns present only when a job asks for them (`OutputColumns`, decided once per job from its
options and input schema, so every part file has one schema): `sample_index` (int32, right
after the input columns) when the job samples n > 1 completions per row or the input has an
`n` column: one output row per sample, the input row's columns repeated, sample_index 0..n-1,
the samples of a row adjacent (an error row is one row with sample_index null);
`cumulative_logprob` (float64) and `logprobs` with `--logprobs` or a per-row `logprobs` input
column, `prompt_logprobs` with `--prompt-logprobs` or a per-row `prompt_logprobs` column (see
`LOGPROBS_TYPE`; the first prompt token's entry is null; null on rows that did not ask).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from vbatch.errors import InputError
from vbatch.io.column_types import decoded_type, is_plain_text
from vbatch.io.column_types import show as _show
from vbatch.io.logprob_columns import LOGPROBS_TYPE, logprobs_array
from vbatch.io.mixed_text import as_text, is_mixed_text

MESSAGES_COLUMN = "messages"
GENERATED_TEXT = "generated_text"
FINISH_REASON = "finish_reason"
NUM_PROMPT_TOKENS = "num_prompt_tokens"
NUM_GENERATED_TOKENS = "num_generated_tokens"
ERROR = "error"
SAMPLE_INDEX = "sample_index"
CUMULATIVE_LOGPROB = "cumulative_logprob"
LOGPROBS = "logprobs"
PROMPT_LOGPROBS = "prompt_logprobs"
#: The response body (JSON text: a ChatCompletion or Completion) of an OpenAI batch request.
RESPONSE = "response"
#: The input column of per-row sample counts (SamplingParams.n): its presence adds
#: `sample_index` to the output.
N_COLUMN = "n"
#: The prompt as token ids (a list of ints per row), used when there is no text prompt column.
TOKEN_IDS_COLUMN = "prompt_token_ids"
#: Per-row stop strings: one string or a list of strings a row.
STOP_COLUMN = "stop"
#: Input columns a JSON lines row may fill with a list or a string alike (read as MIXED_TEXT
#: when a file mixes them, io/mixed_text.py; a bad cell is its row's error).
MIXED_COLUMNS: tuple[str, ...] = (TOKEN_IDS_COLUMN, STOP_COLUMN)
#: Integer input columns that ask for per-row logprobs and are replaced in the output by the
#: column of the same name (the logprobs themselves).
REQUEST_COLUMNS: tuple[str, ...] = (LOGPROBS, PROMPT_LOGPROBS)

#: Columns vbatch appends to every input row, in order.
OUTPUT_FIELDS: tuple[pa.Field, ...] = (
    pa.field(GENERATED_TEXT, pa.string()),
    pa.field(FINISH_REASON, pa.string()),
    pa.field(NUM_PROMPT_TOKENS, pa.int32()),
    pa.field(NUM_GENERATED_TOKENS, pa.int32()),
    pa.field(ERROR, pa.string()),
)
#: Columns vbatch appends only when the job asks for them (see `OutputColumns`).
OPTIONAL_OUTPUT_FIELDS: tuple[pa.Field, ...] = (
    pa.field(SAMPLE_INDEX, pa.int32()),
    pa.field(CUMULATIVE_LOGPROB, pa.float64()),
    pa.field(LOGPROBS, LOGPROBS_TYPE),
    pa.field(PROMPT_LOGPROBS, LOGPROBS_TYPE),
)
OUTPUT_COLUMNS: tuple[str, ...] = tuple(field.name for field in OUTPUT_FIELDS)
#: Every column name vbatch may write: an input column must not use one (a clash is refused
#: whether or not the job asks for the optional ones, so renaming never depends on flags).
#: `response` is not reserved: it is written only for OpenAI batch files, whose columns are
#: vbatch's own (io/openai_batch.py).
RESERVED_COLUMNS: tuple[str, ...] = OUTPUT_COLUMNS + tuple(f.name for f in OPTIONAL_OUTPUT_FIELDS)
_OPTIONAL = {field.name: field for field in (*OPTIONAL_OUTPUT_FIELDS,
                                             pa.field(RESPONSE, pa.string()))}
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


def _is_token_ids(data_type: pa.DataType) -> bool:
    """A column that can hold token-id lists: lists of numbers (floats are checked per cell),
    text (a cell's JSON text, e.g. from CSV) or MIXED_TEXT; bad cells are row errors."""
    data_type = decoded_type(data_type)
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        item = data_type.value_type
        return (pa.types.is_integer(item) or pa.types.is_floating(item)
                or pa.types.is_null(item))
    return _is_text(data_type)


def _is_request_count(data_type: pa.DataType) -> bool:
    return pa.types.is_integer(data_type) or pa.types.is_null(data_type)


def _clashing_columns(schema: pa.Schema) -> list[str]:
    """Input columns named like an output column (an integer `REQUEST_COLUMNS` column is not)."""
    return [name for name in RESERVED_COLUMNS if name in schema.names
            and not (name in REQUEST_COLUMNS and _is_request_count(schema.field(name).type))]


def _clash_error(prefix: str, name: str) -> InputError:
    return InputError(
        f"{prefix}input column {name!r} has the name of a column vbatch writes "
        f"({', '.join(RESERVED_COLUMNS)}); rename it in the input (an integer logprobs or "
        "prompt_logprobs column asks for that many logprobs on its row)")


def check_input_schema(schema: pa.Schema, *, prompt_column: str, file: str) -> str:
    """Check one input file's schema and return the column that holds its prompts.

    Returns `prompt_column` when present (it must hold text, or token-id lists when it is
    `prompt_token_ids`), else `"messages"` (it must be a list of {role, content} structs), else
    `"prompt_token_ids"`. Raises InputError (one line, naming `file`) when none exists, when
    column names repeat, or when a column already uses an output column name.
    """
    names = schema.names
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"{file}: column name {repeated[0]!r} appears more than once")
    clashing = _clashing_columns(schema)
    if clashing:
        raise _clash_error(f"{file}: ", clashing[0])
    if prompt_column in names and prompt_column != TOKEN_IDS_COLUMN:
        data_type = schema.field(prompt_column).type
        if not _is_text(data_type):
            raise InputError(
                f"{file}: column {prompt_column!r} must hold text, not {_show(data_type)}"
            )
        return prompt_column
    if MESSAGES_COLUMN in names and prompt_column != TOKEN_IDS_COLUMN:
        data_type = schema.field(MESSAGES_COLUMN).type
        if not _is_chat(data_type):
            raise InputError(
                f"{file}: column {MESSAGES_COLUMN!r} must be a list of {{role, content}} "
                f"objects, not {_show(data_type)}"
            )
        return MESSAGES_COLUMN
    if TOKEN_IDS_COLUMN in names:
        data_type = schema.field(TOKEN_IDS_COLUMN).type
        if not _is_token_ids(data_type):
            raise InputError(f"{file}: column {TOKEN_IDS_COLUMN!r} must be a list of token ids "
                             f"(integers), not {_show(data_type)}")
        return TOKEN_IDS_COLUMN
    shown = ", ".join(_show(name) for name in names) if names else "none"
    raise InputError(
        f"{file}: no column {prompt_column!r} (columns: {shown}); pass --prompt-column"
    )


@dataclass(frozen=True)
class OutputColumns:
    """Which optional output columns a job writes (the same for all its batches)."""

    sample_index: bool = False
    logprobs: bool = False           # cumulative_logprob and logprobs
    prompt_logprobs: bool = False
    response: bool = False           # OpenAI batch requests: one row a request, its body

    @classmethod
    def for_job(cls, *, n: int, logprobs: int | None, prompt_logprobs: int | None,
                input_names: Sequence[str], openai_requests: bool = False) -> OutputColumns:
        """The columns of a job sampling `n` completions per row (`logprobs` /
        `prompt_logprobs`: the job's K, None when not asked for) over inputs with the column
        names `input_names` (an `n` column may ask for more samples on any row, a `logprobs`
        or `prompt_logprobs` column for logprobs). OpenAI batch requests
        (`openai_requests`) are one output row each, whatever their n, with a `response`
        column (the body, JSON text); their logprobs are in it."""
        if openai_requests:
            return cls(response=True)
        return cls(sample_index=n > 1 or N_COLUMN in input_names,
                   logprobs=logprobs is not None or LOGPROBS in input_names,
                   prompt_logprobs=prompt_logprobs is not None or PROMPT_LOGPROBS in input_names)


    @property
    def leading(self) -> list[pa.Field]:
        """The optional columns between the input columns and `generated_text`."""
        return [_OPTIONAL[SAMPLE_INDEX]] if self.sample_index else []

    @property
    def trailing(self) -> list[pa.Field]:
        """The optional columns after `num_generated_tokens` (before `error`)."""
        fields = []
        if self.logprobs:
            fields += [_OPTIONAL[CUMULATIVE_LOGPROB], _OPTIONAL[LOGPROBS]]
        if self.prompt_logprobs:
            fields.append(_OPTIONAL[PROMPT_LOGPROBS])
        if self.response:
            fields.append(_OPTIONAL[RESPONSE])
        return fields

    def generation_fields(self) -> list[pa.Field]:
        """Every column appended to the input columns, in order."""
        return [*self.leading, *OUTPUT_FIELDS[:-1], *self.trailing, OUTPUT_FIELDS[-1]]


def _passed_through(schema: pa.Schema) -> list[str]:
    """The input columns written to the output: all but the `REQUEST_COLUMNS` (checked to be
    integers), whose output columns take their place. Raises InputError on a name clash."""
    clashing = _clashing_columns(schema)
    if clashing:
        raise _clash_error("", clashing[0])
    return [name for name in schema.names if name not in REQUEST_COLUMNS]


def output_schema(input_schema: pa.Schema, columns: OutputColumns = OutputColumns()) \
        -> pa.Schema:
    """Schema of output rows: the input columns (but `REQUEST_COLUMNS`), then
    `columns.generation_fields()` (by default `OUTPUT_FIELDS`). A `MIXED_TEXT` column
    (io/mixed_text.py) is written as strings.

    Raises InputError when an input column already uses an output column name.
    """
    kept = _passed_through(input_schema)
    fields = [field.with_type(pa.string()) if is_mixed_text(field.type) else field
              for field in input_schema if field.name in kept]
    return pa.schema(fields + columns.generation_fields())


def first_sample_mask(batch: pa.RecordBatch | pa.Table) -> np.ndarray | None:
    """Which output rows are the first (or only) row of their input row: `sample_index` 0 or
    null (an error row). None when the batch has no `sample_index` column (every output row is
    one input row)."""
    if SAMPLE_INDEX not in batch.schema.names:
        return None
    index = batch.column(SAMPLE_INDEX)
    if isinstance(index, pa.ChunkedArray):
        index = index.combine_chunks()
    return np.asarray(index.fill_null(0).to_numpy(zero_copy_only=False) == 0, dtype=bool)


def count_input_rows(batch: pa.RecordBatch | pa.Table) -> int:
    """The number of input rows that the output rows of `batch` answer (see
    `first_sample_mask`): its row count unless the job samples several completions a row."""
    mask = first_sample_mask(batch)
    return batch.num_rows if mask is None else int(mask.sum())


def _column(field: pa.Field, values: list) -> pa.Array:
    if field.type.equals(LOGPROBS_TYPE):
        return logprobs_array(values)
    return pa.array(values, type=field.type)


def _check_result(row: int, result: dict) -> None:
    error = result.get(ERROR)
    if error is not None:
        if not isinstance(error, str) or not error:
            raise ValueError(f"row {row}: error must be a non-empty string, got {error!r}")
        filled = [name for name in RESERVED_COLUMNS if name != ERROR
                  and result.get(name) is not None]
        if filled:
            raise ValueError(f"row {row}: an error row must not set {filled[0]!r}")
    elif result[FINISH_REASON] not in FINISH_REASONS:
        raise ValueError(
            f"row {row}: finish_reason {result[FINISH_REASON]!r} not in {FINISH_REASONS}"
        )


def build_output_batch(input_batch: pa.RecordBatch, results: Sequence[dict | Sequence[dict]],
                       columns: OutputColumns = OutputColumns()) -> pa.RecordBatch:
    """Append the generation results to `input_batch`, row for row.

    `results[i]` belongs to row i: one result (a dict), or the list of its samples' results
    (one output row each, the input row's columns repeated, in list order). A generated row
    has the keys generated_text (str), finish_reason ("stop" or "length"), num_prompt_tokens
    and num_generated_tokens (ints), optionally error=None, and the keys of the optional
    `columns` it has (sample_index, default: its place in its row's list; cumulative_logprob;
    logprobs and prompt_logprobs, see `logprobs_array`); other keys are ignored. An error row
    has `error` (a non-empty "<code>: <message>" string) and no other key, or those keys set to
    None; its generation columns (sample_index included) are written as nulls.
    Returns a batch with schema `output_schema(input_batch.schema, columns)`. Raises InputError
    on a column-name clash and ValueError when results do not match the batch (a bug in the
    caller, not in the data).
    """
    schema = output_schema(input_batch.schema, columns)
    if len(results) != input_batch.num_rows:
        raise ValueError(f"got {len(results)} results for a batch of {input_batch.num_rows} rows")
    rows: list[dict] = []
    take: list[int] = []
    for row, result in enumerate(results):
        samples = [result] if isinstance(result, dict) else list(result)
        if not samples:
            raise ValueError(f"row {row}: no result")
        for sample, one in enumerate(samples):
            _check_result(row, one)
            if one.get(ERROR) is None:
                if len(samples) > 1 and not columns.sample_index:
                    raise ValueError(f"row {row}: {len(samples)} samples but no "
                                     f"{SAMPLE_INDEX} column")
                one = {**one, SAMPLE_INDEX: one.get(SAMPLE_INDEX, sample)}
            rows.append(one)
            take.append(row)
    generated = [_column(field, [one.get(field.name) for one in rows])
                 for field in columns.generation_fields()]
    kept = _passed_through(input_batch.schema)
    if len(kept) != input_batch.num_columns:
        input_batch = input_batch.select(kept)
    if len(take) != input_batch.num_rows:
        input_batch = input_batch.take(pa.array(take, pa.int64()))
    inputs = [as_text(column) if is_mixed_text(column.type) else column
              for column in input_batch.columns]
    return pa.RecordBatch.from_arrays(inputs + generated, schema=schema)
