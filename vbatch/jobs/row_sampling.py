"""Per-row sampling values: optional input columns that override the job's `SamplingParams`.

An input column named after a `SamplingParams` option declared `per_row` (`temperature`,
`top_p`, `top_k`, `min_p`, `seed`, `max_tokens`) sets that parameter for its row; a null cell
keeps the job's value. Cells are converted here (CSV columns may hold numbers as text); values
are checked by `SamplingParams`' own declared checks; an impossible one (temperature -1, top_p
0, a word in a number column) makes that row an error row (`bad_sampling`), never the job.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pyarrow as pa

from vbatch.engine.sampling_params import SamplingParams
from vbatch.jobs.row_errors import BAD_SAMPLING, RowError
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


def _cell_converter(declared: DeclaredOption) -> Callable[[object], object]:
    if declared.name == "seed":
        return _as_seed             # seeds are hashed as unsigned 64-bit integers
    return {int: _as_int, float: _as_float}[base_type(declared.type)]


#: Column name -> converter of one cell (raises TypeError naming what it expected): the
#: `SamplingParams` options declared `per_row`, in declaration order.
SAMPLING_COLUMNS: dict[str, Callable[[object], object]] = {
    declared.name: _cell_converter(declared) for declared in declared_options(SamplingParams)
    if declared.spec.per_row}


class RowSampling:
    """Per-row `SamplingParams`: the job's `base` params with each row's overrides applied."""

    def __init__(self, base: SamplingParams):
        self.base = base

    @staticmethod
    def override_columns(schema: pa.Schema) -> list[str]:
        """The per-row sampling columns present in `schema`, in `SAMPLING_COLUMNS` order."""
        return [name for name in SAMPLING_COLUMNS if name in schema.names]

    def for_batch(self, batch: pa.RecordBatch) -> list[SamplingParams | RowError]:
        """One entry per row of `batch`: its `SamplingParams` (the `base` object itself when the
        row overrides nothing), or a `bad_sampling` RowError naming the column and value."""
        names = self.override_columns(batch.schema)
        if not names:
            return [self.base] * batch.num_rows
        columns = [(name, batch.column(name).to_pylist()) for name in names]
        return [self._row_params([(name, values[row]) for name, values in columns])
                for row in range(batch.num_rows)]

    def _row_params(self, cells: list[tuple[str, object]]) -> SamplingParams | RowError:
        overrides = {}
        for name, value in cells:
            if value is None:
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
