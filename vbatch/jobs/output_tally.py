"""What a job has written so far, counted from the output batches themselves.

Counting what is written (not what replicas say they did) keeps the counts exact when a replica
dies and is restarted, or a Ray task is retried: their own counters die with them, and a batch
computed twice is written once. Parts that Ray replicas wrote themselves are counted from
their part entries instead (`accept_part`: the same counts, recorded per part), and refused
when any of their positions was written or committed before. `count_ids` reads the finished
output's id column back: ids that repeat or are null (the job runs them all, but they do not
name one row each), from a local directory or an object-store prefix (through its pyarrow
filesystem: only the id columns' byte ranges are fetched).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vbatch.io.directory import OutputDirectory
from vbatch.io.object_store_dir import ObjectStoreDirectory
from vbatch.io.output_dir import PART_FILE_PATTERN, JobDirectory
from vbatch.io.positions import POSITION_COLUMN, IntervalSet
from vbatch.io.schema import (
    ERROR,
    NUM_GENERATED_TOKENS,
    NUM_PROMPT_TOKENS,
    SAMPLE_INDEX,
    first_sample_mask,
)


class OutputTally:
    """What has been written so far, read from the output batches themselves: row, error-row
    and token counts (the `RowCounts` an `ErrorBudget` checks while the job runs), and the
    positions written. `accept` drops rows whose positions were already written, so a batch a
    restarted replica or a Ray task retry computes twice is still written once; the output
    rows of one position (the n samples of a row) are dropped or kept together.

    `num_rows` counts input rows (error rows included), `num_output_rows` the rows written
    (one per sample); prompt tokens count once per input row, output tokens of every sample.

    `committed_before`: the positions earlier runs committed (a resumed job); `accept_part`
    refuses a part holding any of them as it refuses one holding rows this run wrote."""

    def __init__(self, committed_before: IntervalSet | None = None) -> None:
        self.num_rows = 0
        self.num_output_rows = 0
        self.num_error_rows = 0
        self.num_prompt_tokens = 0
        self.num_output_tokens = 0
        self.num_duplicate_rows = 0
        self.first_error: str | None = None
        self.written = IntervalSet()
        self.committed_before = committed_before or IntervalSet()

    def accept_part(self, entry: dict, first_error: str | None = None) -> bool:
        """Count the part another writer wrote (`entry`: its part entry, with `positions`,
        `num_rows`, `num_output_rows` when it differs and the `part_counts`) and return True,
        or return False (counting nothing but `num_duplicate_rows`) when any of its positions
        was written or committed before: a retried block whose first attempt's part arrived
        too. `first_error`: the part's first error row ("row <key>: <error>"), if any."""
        intervals = IntervalSet(entry.get("positions") or [])
        if len(intervals) != entry["num_rows"]:
            raise ValueError(f"part {entry.get('name')} lists {entry['num_rows']} rows but "
                             f"positions covering {len(intervals)}")
        if self._overlaps(intervals):
            self.num_duplicate_rows += entry["num_rows"]
            return False
        self.written.update(intervals)
        self.num_rows += entry["num_rows"]
        self.num_output_rows += entry.get("num_output_rows", entry["num_rows"])
        self.num_error_rows += entry.get("num_error_rows", 0)
        self.num_prompt_tokens += entry.get("num_prompt_tokens", 0)
        self.num_output_tokens += entry.get("num_output_tokens", 0)
        if first_error is not None and self.first_error is None:
            self.first_error = first_error
        return True

    def _overlaps(self, intervals: IntervalSet) -> bool:
        """True when `intervals` shares a position with what is written or committed (their
        union is smaller than the sizes added; O(intervals), never O(positions))."""
        for known in (self.written, self.committed_before):
            if len(known) and len(intervals):
                union = IntervalSet(known.to_list())
                union.update(intervals)
                if len(union) != len(known) + len(intervals):
                    return True
        return False

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
        first = first_sample_mask(batch)
        self.num_output_rows += batch.num_rows
        self.num_rows += batch.num_rows if first is None else int(first.sum())
        for name, attribute in ((NUM_PROMPT_TOKENS, "num_prompt_tokens"),
                                (NUM_GENERATED_TOKENS, "num_output_tokens")):
            if name in batch.schema.names and batch.num_rows:
                values = batch.column(name)
                if name == NUM_PROMPT_TOKENS and first is not None:
                    values = values.filter(pa.array(first))     # one prompt per input row
                total = pc.sum(values).as_py() or 0
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


@dataclass(frozen=True)
class IdCounts:
    """Row keys of a finished output that do not name one row each: `duplicate_ids` rows whose
    id an earlier row already has (ids a, a, a: 2), `null_ids` rows without an id."""

    duplicate_ids: int = 0
    null_ids: int = 0

    def warning(self, id_column: str) -> str | None:
        """One line for stderr when there are any, else None."""
        if not (self.duplicate_ids or self.null_ids):
            return None
        return (f"warning: column {id_column!r} has {self.duplicate_ids:,} duplicate and "
                f"{self.null_ids:,} null ids in the output; every row was generated once (its "
                "random draws keyed by its input position), but those ids do not name one row")


def output_part_files(output: JobDirectory | str | Path) -> list[Path] | list[str]:
    """The Parquet part files in `output`, in name order (JSON lines parts left out): a local
    directory (handle or path) gives local paths; an `ObjectStoreDirectory` gives paths within
    its `location.arrow_fs` (`bucket/key`; pass `filesystem=output_filesystem(output)` to
    `count_ids`)."""
    if isinstance(output, ObjectStoreDirectory):
        prefix = output.location.path.rstrip("/")
        return [f"{prefix}/{name}" for name in output.names() if _is_parquet_part(name)]
    directory = output.path if isinstance(output, OutputDirectory) else Path(output)
    return sorted(path for path in directory.iterdir() if _is_parquet_part(path.name))


def _is_parquet_part(name: str) -> bool:
    return PART_FILE_PATTERN.fullmatch(name) is not None and name.endswith(".parquet")


def output_filesystem(output: JobDirectory | str | Path) -> pafs.FileSystem | None:
    """The pyarrow filesystem `output_part_files(output)`'s paths are in (None: local)."""
    return output.location.arrow_fs if isinstance(output, ObjectStoreDirectory) else None


def count_ids(part_files: Sequence[Path | str], id_column: str,
              filesystem: pafs.FileSystem | None = None) -> IdCounts:
    """Duplicate and null ids over all input rows of `part_files` (paths within `filesystem`,
    None for local ones; reads only the id column, and `sample_index` when there is one: the
    samples of a row share its id, so only each row's first sample counts)."""
    if not part_files:
        return IdCounts()
    columns = [id_column]
    if SAMPLE_INDEX in pq.read_schema(part_files[0], filesystem=filesystem).names:
        columns.append(SAMPLE_INDEX)
    table = pq.read_table([str(path) for path in part_files], columns=columns,
                          filesystem=filesystem)
    first = first_sample_mask(table)
    if first is not None:
        table = table.filter(pa.array(first))
    ids = table.column(id_column)
    try:
        distinct = pc.count_distinct(ids, mode="only_valid").as_py()
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError):  # e.g. struct ids
        distinct = len({repr(value) for value in ids.to_pylist() if value is not None})
    return IdCounts(duplicate_ids=len(ids) - ids.null_count - distinct, null_ids=ids.null_count)
