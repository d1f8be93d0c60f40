"""Per-row sampling values: optional input columns that override the job's `SamplingParams`.

An input column named after a `SamplingParams` option declared `per_row` (`n`,
`temperature`, `top_p`, `top_k`, `min_p`, `seed`, `stop`, `max_tokens`, `logprobs`,
`prompt_logprobs`, `repetition_penalty`, `presence_penalty`, `frequency_penalty`, `ignore_eos`:
`SAMPLING_COLUMNS`) sets that parameter for its row; a null cell keeps the job's value. Cells
are converted here (CSV columns may hold numbers and booleans as text); values are checked by
`SamplingParams`' own declared checks; an impossible one (temperature -1, top_p 0, n 0,
logprobs 21, a word in a number column) makes that row an error row (`bad_sampling`), never
the job. A `stop` cell is one string or a list of strings and replaces the job's `--stop`
strings for its row (an empty list: none); an `ignore_eos` cell is a boolean (or, as text,
true/false/1/0).

A `structured_outputs` column (a struct, or a JSON string, with one of the keys choice, regex,
json, grammar, json_object) replaces the job's structured output for its row; a cell that is
not such a spec, or whose grammar xgrammar cannot build (`to_grammar`: a bad regex, schema or
EBNF; checked here once per distinct cell, before the row reaches the engine), makes the row a
`bad_structured_output` error row (what fails only against the tokenizer is refused by the
engine when the row is added, see `jobs/replica.py`). Parsed cells are cached by value, so rows
that share a spec share one `StructuredOutputsParams`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

import pyarrow as pa

from vbatch.engine.sampling_params import SamplingParams
from vbatch.engine.structured_output import StructuredOutputsParams
from vbatch.io.mixed_text import python_values
from vbatch.jobs.row_errors import BAD_SAMPLING, BAD_STRUCTURED_OUTPUT, RowError
from vbatch.options import DeclaredOption, base_type, declared_options

_INT64_MAX = 2**63 - 1


def _as_int(value: object) -> int:
    if isinstance(value, bool):
        raise TypeError("an integer")
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise TypeError("an integer") from None
    if isinstance(value, float):
        if not value.is_integer():
            raise TypeError("an integer")
        value = int(value)
    if not isinstance(value, int):
        raise TypeError("an integer")
    if abs(value) > _INT64_MAX:
        raise TypeError("an integer that fits in 64 bits")
    return value


def _as_float(value: object) -> float:
    if isinstance(value, bool):
        raise TypeError("a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise TypeError("a number") from None
    if not isinstance(value, (int, float)):
        raise TypeError("a number")
    if not math.isfinite(value):
        raise TypeError("a finite number")
    return float(value)


def _as_seed(value: object) -> int:
    seed = _as_int(value)
    if seed < 0:
        raise TypeError("an integer >= 0")
    return seed


_BOOL_TEXT = {"true": True, "false": False, "1": True, "0": False}


def _as_bool(value: object) -> bool:
    if isinstance(value, str) and value.strip().lower() in _BOOL_TEXT:
        return _BOOL_TEXT[value.strip().lower()]
    if not isinstance(value, bool):
        raise TypeError("true or false")
    return value


def _as_strings(value: object) -> str | list[str]:
    if isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError("a string or a list of strings")
    return list(value)


def _cell_converter(declared: DeclaredOption) -> Callable[[object], object]:
    if declared.name == "seed":
        return _as_seed             # seeds are hashed as unsigned 64-bit integers
    return {int: _as_int, float: _as_float, bool: _as_bool,
            list: _as_strings}[base_type(declared.type)]


#: Column name -> converter of one cell (raises TypeError naming what it expected): the
#: `SamplingParams` options declared `per_row`, in declaration order.
SAMPLING_COLUMNS: dict[str, Callable[[object], object]] = {
    declared.name: _cell_converter(declared) for declared in declared_options(SamplingParams)
    if declared.spec.per_row}


#: The per-row structured-output column.
STRUCTURED_OUTPUTS_COLUMN = "structured_outputs"
#: Distinct structured-output cells remembered per replica (parsing is cheap; this only keeps
#: rows that share a spec on one `StructuredOutputsParams`).
_MAX_CACHED_SPECS = 4096


def _without_nulls(value: object) -> object:
    """`value` with every None-valued key of its dicts dropped, at any depth (lists kept)."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _struct_cell(value: object) -> object:
    """A struct cell (a dict) as its spec. Arrow merges the fields of a struct column over all
    rows, so a row's cell holds None for every key another row has: None-valued keys are
    dropped, at the top (a key only another row uses, even an unknown one, is not this row's)
    and inside a `json` schema given as a nested struct (in a struct a null and a missing key
    are one; a JSON string cell keeps its nulls)."""
    if not isinstance(value, dict):
        return value
    value = {key: item for key, item in value.items() if item is not None}
    if isinstance(value.get("json"), dict):
        value["json"] = _without_nulls(value["json"])
    return value


def _cell_key(value: object) -> str | None:
    """A hashable key of a structured-output cell (None when it cannot be keyed)."""
    if isinstance(value, str):
        return "s" + value
    try:
        return "v" + json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        return None


class RowSampling:
    """Per-row `SamplingParams`: the job's `base` params with each row's overrides applied."""

    def __init__(self, base: SamplingParams):
        self.base = base
        self._specs: dict[str, StructuredOutputsParams | RowError] = {}

    @staticmethod
    def override_columns(schema: pa.Schema) -> list[str]:
        """The per-row sampling columns present in `schema`, in `SAMPLING_COLUMNS` order, then
        `structured_outputs` when present."""
        names = [name for name in SAMPLING_COLUMNS if name in schema.names]
        if STRUCTURED_OUTPUTS_COLUMN in schema.names:
            names.append(STRUCTURED_OUTPUTS_COLUMN)
        return names

    def for_batch(self, batch: pa.RecordBatch) -> list[SamplingParams | RowError]:
        """One entry per row of `batch`: its `SamplingParams` (the `base` object itself when the
        row overrides nothing), or a RowError naming the column and value (`bad_sampling`, or
        `bad_structured_output` for a `structured_outputs` cell)."""
        names = self.override_columns(batch.schema)
        if not names:
            return [self.base] * batch.num_rows
        columns = [(name, python_values(batch.column(name))) for name in names]
        return [self._row_params([(name, values[row]) for name, values in columns])
                for row in range(batch.num_rows)]

    def _row_params(self, cells: list[tuple[str, object]]) -> SamplingParams | RowError:
        overrides = {}
        for name, value in cells:
            if value is None:
                continue
            if name == STRUCTURED_OUTPUTS_COLUMN:
                spec = self._structured_outputs(value)
                if isinstance(spec, RowError):
                    return spec
                overrides[name] = spec
                continue
            try:
                overrides[name] = SAMPLING_COLUMNS[name](value)
            except TypeError as expected:
                return RowError(BAD_SAMPLING, f"{name} must be {expected}, got {value!r}")
        if not overrides:
            return self.base
        try:
            return dataclasses.replace(self.base, **overrides)   # runs SamplingParams.validate
        except ValueError as error:
            return RowError(BAD_SAMPLING, str(error))

    def _structured_outputs(self, value: object) -> StructuredOutputsParams | RowError:
        """The spec of one non-null `structured_outputs` cell, or a `bad_structured_output`
        RowError."""
        key = _cell_key(value)
        cached = self._specs.get(key) if key is not None else None
        if cached is not None:
            return cached
        try:
            spec: StructuredOutputsParams | RowError = StructuredOutputsParams.from_value(
                _struct_cell(value))
            spec.to_grammar()       # xgrammar loads here, only for jobs with such a column
        except (ValueError, TypeError) as error:
            message = str(error)
            if not message.startswith(STRUCTURED_OUTPUTS_COLUMN):
                message = f"{STRUCTURED_OUTPUTS_COLUMN}: {message}"
            spec = RowError(BAD_STRUCTURED_OUTPUT, message)
        if key is not None and len(self._specs) < _MAX_CACHED_SPECS:
            self._specs[key] = spec
        return spec
