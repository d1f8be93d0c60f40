"""Input-batch tags: which input batch, and which row of it, each output row answers; input order.

A pool that hands batches to replicas tags each with two hidden int64 columns (added before the
batch leaves the driver, dropped before writing): the batch's sequence number and each row's
index within it. Replicas return finished rows in small output batches as they finish (the n
samples of a row together), so the tags tell the pool which rows of which batch came back
(each exactly once; a restarted replica gets only the rest: `batch.take(...)` keeps the tags)
and, with `--preserve-order`, let `InputOrder` release rows in input order.

`IDLE_INTERVAL_S`: a pool yields at least this often, a batch of zero rows (`idle_batch()`)
when no row came back, so the job pipeline can act on time (commit buffered rows) while
replicas are busy.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from vbatch.errors import InputError

SEQ_COLUMN = "__vbatch_batch_seq__"
ROW_COLUMN = "__vbatch_batch_row__"
IDLE_INTERVAL_S = 1.0


def idle_batch() -> pa.RecordBatch:
    """A batch of zero rows and no columns: "nothing came back yet" from a pool."""
    return pa.RecordBatch.from_pydict({})


def tag_batch(batch: pa.RecordBatch, seq: int) -> pa.RecordBatch:
    """`batch` plus the hidden sequence-number column (every row `seq`) and row-index column
    (0, 1, ...), both int64."""
    for name in (SEQ_COLUMN, ROW_COLUMN):
        if name in batch.schema.names:
            raise InputError(f"input column {name!r} is reserved by vbatch; rename it")
    batch = batch.append_column(SEQ_COLUMN, pa.array(np.full(batch.num_rows, seq, np.int64)))
    return batch.append_column(ROW_COLUMN, pa.array(np.arange(batch.num_rows, dtype=np.int64)))


def untag_batch(batch: pa.RecordBatch) -> tuple[int | None, np.ndarray, pa.RecordBatch]:
    """(sequence number, each row's index in its input batch, `batch` without the hidden
    columns); the sequence number is None for a batch of zero rows. An output batch answers one
    input batch (a replica never mixes two in one output batch)."""
    seq_index = batch.schema.get_field_index(SEQ_COLUMN)
    seq = batch.column(seq_index)[0].as_py() if batch.num_rows else None
    rows = batch.column(ROW_COLUMN).to_numpy(zero_copy_only=False).astype(np.int64)
    return seq, rows, batch.drop_columns([SEQ_COLUMN, ROW_COLUMN])


class InputOrder:
    """Holds output rows back until every earlier input row is out: rows of batch `seq` (by
    sequence number 0, 1, ...) in row order, the samples of a row in the order they came.

    `expect(seq, num_rows)` announces each batch (before its rows can come back); `release`
    returns what is due. Rows held are those of batches after the first unfinished row: a pool
    bounds them by not handing out batches past `next_seq + window`."""

    def __init__(self) -> None:
        self._sizes: dict[int, int] = {}
        self._pieces: dict[int, list[tuple[np.ndarray, pa.RecordBatch]]] = {}
        self._next_seq = 0
        self._next_row = 0          # of batch `_next_seq`: rows before it are out
        self._num_held = 0

    def expect(self, seq: int, num_rows: int) -> None:
        """Announce input batch `seq` of `num_rows` rows."""
        self._sizes[seq] = num_rows

    @property
    def next_seq(self) -> int:
        """The first batch not yet fully released."""
        return self._next_seq

    @property
    def num_held(self) -> int:
        """Output rows back but still waiting for an earlier row."""
        return self._num_held

    def release(self, seq: int, rows: np.ndarray, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        """Add the output rows `batch` of input batch `seq` (`rows[i]`: output row i's index in
        its input batch); return the output batches now due, in input order."""
        if batch.num_rows:
            self._pieces.setdefault(seq, []).append((rows, batch))
            self._num_held += batch.num_rows
        due = []
        while self._next_seq in self._sizes:
            size = self._sizes[self._next_seq]
            pieces = self._pieces.get(self._next_seq)
            if pieces and self._next_row < size:
                due_batch = self._release_head(pieces, size)
                if due_batch is not None:
                    due.append(due_batch)
            if self._next_row < size:
                break
            del self._sizes[self._next_seq]
            self._pieces.pop(self._next_seq, None)
            self._next_seq, self._next_row = self._next_seq + 1, 0
        return due

    def _release_head(self, pieces: list, size: int) -> pa.RecordBatch | None:
        """The rows of the first unfinished batch that are now due (a run of rows from
        `_next_row`), the rest kept as one piece."""
        rows = np.concatenate([piece_rows for piece_rows, _ in pieces])
        back = np.zeros(size + 1, bool)          # a sentinel False after the last row
        back[rows] = True
        back[:self._next_row] = True
        end = int(np.argmin(back))               # the first row not back yet
        if end == self._next_row:
            return None
        table = pa.Table.from_batches([piece for _, piece in pieces])
        is_due = rows < end
        due_rows = np.flatnonzero(is_due)
        order = due_rows[np.argsort(rows[due_rows], kind="stable")]
        kept = np.flatnonzero(~is_due)
        pieces[:] = [(rows[kept], _one_batch(table.take(kept)))] if kept.size else []
        self._next_row = end
        self._num_held -= order.size
        return _one_batch(table.take(order))


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.combine_chunks().to_batches()
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)
