"""Row positions: where each input row sits, so committed rows can be named compactly.

Every input row gets an int64 position, (file index << 40) | row index within the file (files
in the job's sorted input order; up to 2^40 rows per file). While a job runs, each batch carries
its positions in the hidden column `POSITION_COLUMN`, which the replicas pass through untouched
and the writer strips before writing. The writer records which positions every committed part
file holds as an `IntervalSet` of half-open [start, end) ranges: rows finish in batches of
consecutive positions, so a job of millions of rows needs a few thousand intervals, not
millions of row keys, and a resumed job skips committed rows by position (the job fingerprint
guarantees the same files, so the same position is the same row and the same row key).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa

POSITION_COLUMN = "__vbatch_position"
ROW_BITS = 40


def position_of(file_index: int, row: int) -> int:
    """The position of row `row` (0-based) of the `file_index`-th input file."""
    return (file_index << ROW_BITS) | row


def position_array(file_index: int, first_row: int, num_rows: int) -> pa.Array:
    """Positions of `num_rows` consecutive rows of one file, as an int64 Arrow array."""
    start = position_of(file_index, first_row)
    return pa.array(np.arange(start, start + num_rows, dtype=np.int64))


class IntervalSet:
    """A set of int64 positions stored as sorted, disjoint, non-adjacent [start, end) ranges."""

    def __init__(self, intervals: Iterable[tuple[int, int]] = ()):
        self._starts = np.empty(0, dtype=np.int64)
        self._ends = np.empty(0, dtype=np.int64)
        pairs = [(int(s), int(e)) for s, e in intervals if e > s]
        if pairs:
            self._merge(np.array([s for s, _ in pairs], dtype=np.int64),
                        np.array([e for _, e in pairs], dtype=np.int64))

    @classmethod
    def from_positions(cls, positions) -> IntervalSet:
        """The set of the given positions (any order, duplicates allowed)."""
        result = cls()
        result.add_positions(positions)
        return result

    def add_positions(self, positions) -> None:
        """Add every position of an int array (numpy, Arrow or list)."""
        values = np.unique(np.asarray(positions, dtype=np.int64))
        if values.size == 0:
            return
        breaks = np.flatnonzero(np.diff(values) != 1) + 1
        starts = values[np.concatenate(([0], breaks))]
        ends = values[np.concatenate((breaks - 1, [values.size - 1]))] + 1
        self._merge(starts, ends)

    def update(self, other: IntervalSet) -> None:
        """Add every position of `other`."""
        self._merge(other._starts, other._ends)

    def _merge(self, starts: np.ndarray, ends: np.ndarray) -> None:
        all_starts = np.concatenate((self._starts, starts))
        all_ends = np.concatenate((self._ends, ends))
        if all_starts.size == 0:
            return
        order = np.argsort(all_starts, kind="stable")
        all_starts, all_ends = all_starts[order], all_ends[order]
        running_end = np.maximum.accumulate(all_ends)
        # A new interval begins where a start lies past every earlier end (not adjacent).
        new = np.concatenate(([True], all_starts[1:] > running_end[:-1]))
        group_ends = np.concatenate((np.flatnonzero(new)[1:] - 1, [new.size - 1]))
        self._starts = all_starts[new]
        self._ends = running_end[group_ends]

    def contains(self, positions) -> np.ndarray:
        """Boolean mask: which of `positions` are in the set."""
        values = np.asarray(positions, dtype=np.int64)
        index = np.searchsorted(self._starts, values, side="right") - 1
        inside = index >= 0
        clipped = np.where(inside, index, 0)
        return inside & (values < self._ends[clipped]) if self._ends.size else \
            np.zeros(values.shape, dtype=bool)

    def __len__(self) -> int:
        """Number of positions in the set."""
        return int((self._ends - self._starts).sum())

    @property
    def num_intervals(self) -> int:
        return int(self._starts.size)

    def to_list(self) -> list[list[int]]:
        """JSON-ready [[start, end], ...]."""
        return [[int(s), int(e)] for s, e in zip(self._starts, self._ends)]

    def __eq__(self, other) -> bool:
        return isinstance(other, IntervalSet) and self.to_list() == other.to_list()

    def __repr__(self) -> str:
        return f"IntervalSet({self.to_list()[:4]}{'...' if self.num_intervals > 4 else ''})"
