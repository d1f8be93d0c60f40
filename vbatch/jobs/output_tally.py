"""What a job has written so far, counted from the output batches themselves.

Counting what is written (not what replicas say they did) keeps the counts exact when a replica
dies and is restarted, or a Ray task is retried: their own counters die with them, and a batch
computed twice is written once.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from vbatch.io.positions import POSITION_COLUMN, IntervalSet
from vbatch.io.schema import ERROR, NUM_GENERATED_TOKENS, NUM_PROMPT_TOKENS


class OutputTally:
    """What has been written so far, read from the output batches themselves: row, error-row
    and token counts (the `RowCounts` an `ErrorBudget` checks while the job runs), and the
    positions written. `accept` drops rows whose positions were already written, so a batch a
    restarted replica or a Ray task retry computes twice is still written once."""

    def __init__(self) -> None:
        self.num_rows = 0
        self.num_error_rows = 0
        self.num_prompt_tokens = 0
        self.num_output_tokens = 0
        self.num_duplicate_rows = 0
        self.first_error: str | None = None
        self.written = IntervalSet()

    def accept(self, batch: pa.RecordBatch, id_column: str) -> pa.RecordBatch:
        """`batch` without rows already written; counts what it returns."""
        if POSITION_COLUMN in batch.schema.names:
            positions = batch.column(POSITION_COLUMN).to_numpy(zero_copy_only=False)
            seen = self.written.contains(positions)
            if seen.any():
                self.num_duplicate_rows += int(seen.sum())
                batch = batch.filter(pa.array(~seen))
                positions = positions[~seen]
            self.written.add_positions(positions)
        self.num_rows += batch.num_rows
        for name, attribute in ((NUM_PROMPT_TOKENS, "num_prompt_tokens"),
                                (NUM_GENERATED_TOKENS, "num_output_tokens")):
            if name in batch.schema.names and batch.num_rows:
                total = pc.sum(batch.column(name)).as_py() or 0
                setattr(self, attribute, getattr(self, attribute) + total)
        if ERROR not in batch.schema.names:
            return batch
        errors = batch.column(ERROR)
        num_errors = batch.num_rows - errors.null_count
        if num_errors and self.first_error is None:
            row = pc.index(pc.is_valid(errors), True).as_py()
            key = batch.column(id_column)[row].as_py()
            self.first_error = f"row {key}: {errors[row].as_py()}"
        self.num_error_rows += num_errors
        return batch
