"""Input-batch sequence numbers: which input batch an output batch answers, and input order.

A pool that hands batches to replicas tags each with a hidden int64 column (every row the
batch's sequence number, added before the batch leaves the driver, dropped before writing), so
it can check that each batch came back once with all its rows and, with `--preserve-order`,
release output batches in input order (`InputOrder`).
"""
from __future__ import annotations

import pyarrow as pa

from vbatch.errors import InputError

SEQ_COLUMN = "__vbatch_batch_seq__"


def tag_batch(batch: pa.RecordBatch, seq: int) -> pa.RecordBatch:
    """`batch` plus the hidden sequence-number column (int64, every row `seq`)."""
    if SEQ_COLUMN in batch.schema.names:
        raise InputError(f"input column {SEQ_COLUMN!r} is reserved by vbatch; rename it")
    column = pa.array([seq] * batch.num_rows, type=pa.int64())
    return batch.append_column(SEQ_COLUMN, column)


def untag_batch(batch: pa.RecordBatch) -> tuple[int | None, pa.RecordBatch]:
    """(sequence number, `batch` without the hidden column); None for a batch of zero rows."""
    index = batch.schema.get_field_index(SEQ_COLUMN)
    seq = batch.column(index)[0].as_py() if batch.num_rows else None
    return seq, batch.remove_column(index)


class InputOrder:
    """Holds output batches back until every earlier one (by sequence number 0, 1, ...) is out."""

    def __init__(self) -> None:
        self._finished: dict[int, pa.RecordBatch] = {}
        self._next = 0

    def release(self, seq: int, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        """Add batch `seq`; return the batches now due, in input order."""
        self._finished[seq] = batch
        due = []
        while self._next in self._finished:
            due.append(self._finished.pop(self._next))
            self._next += 1
        return due

    @property
    def num_held(self) -> int:
        """Batches back but still waiting for an earlier one."""
        return len(self._finished)
