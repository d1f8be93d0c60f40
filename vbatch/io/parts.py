"""Arrow batches -> Parquet part files in a job directory, committed through the commit log.

The same writer commits parts of another format (`write_part` + `suffix`: the OpenAI batch
output JSON lines of `--output-format openai`), with the same protocol, names and manifest.

`ParquetPartWriter` buffers rows and writes a part file (`write_atomically` of the directory
handle: temporary name, fsync, rename on a local disk) whenever `rows_per_file` rows are
buffered, or at once on `flush()`; with `job_info` it then appends one record naming the part
to the commit log (io/commit_log.py: a part is committed once the log names it; constant cost
per part). `commit` writes the final `_manifest.json` once, removes the log, and then writes
`_SUCCESS`. File names: io/output_dir.py.

The output rows of one input position (the n samples of a row, adjacent) always go to the same
part, so a part commits whole input rows and `--resume`, which skips committed positions, never
finds half a row's samples committed.

Parts written elsewhere: on the Ray runner with an object-store output each replica writes its
own parts (a writer of its own, without `job_info`, naming them with `part_name`: unique per
replica attempt) and sends the job's writer only their entries (`entries()`); the job's writer
commits each with `commit_written_part` (one log record, as for its own parts). A part file
whose entry never arrived or was refused (a replica killed before its block returned, a
retried block) is named by no record: `remove_uncommitted_parts` deletes it at the end of the
job (and `--resume` does, io/manifest.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vbatch.io.atomic import temp_name_for
from vbatch.io.commit_log import DEFAULT_CHECKPOINT_INTERVAL, CommitLog
from vbatch.io.directory import OutputDirectory
from vbatch.io.manifest import part_counts, write_manifest
from vbatch.io.output_dir import (
    MANIFEST_FILE,
    PART_FILE_PATTERN,
    SUCCESS_FILE,
    part_file_index,
    part_file_name,
)
from vbatch.io.positions import POSITION_COLUMN, IntervalSet
from vbatch.io.schema import count_input_rows


class ParquetPartWriter:
    """Buffer rows and write them as Parquet part files of at most `rows_per_file` rows into
    `output_dir`: a job's open `OutputDirectory` handle (every file is written relative to it;
    the caller closes it), or a path (created if missing, opened here and closed when the
    writer commits or aborts; see `prepare_output_dir` for an existing one).

    With `job_info` (a job's writer: {"fingerprint": ...}) the directory is marked unfinished
    before anything else is written: `_SUCCESS` is removed first, then the commit log starts
    (a checkpoint holding the fingerprint and `existing_parts`, every `checkpoint_interval`
    records another) and the earlier run's `_manifest.json` is removed, so a resumed job
    killed at any point never leaves `_SUCCESS` beside parts it added. Each part is committed
    by one log record.

    `write()` takes record batches (or tables) with one schema (`schema`, or the first batch's;
    batches whose column names match are cast to it). Rows with the same position (the
    samples of one input row) must be adjacent and written in one batch; they are never split
    between two parts: a part ends at the last position boundary within `rows_per_file` rows,
    or, when one position alone has more rows, right after that position's rows (rows whose
    position is not known are each their own). `flush()` writes the buffered rows as a part
    now. `close()` writes the remaining rows (and, when no row was written at all, one empty
    part file so readers still see the schema). `commit(manifest)` closes, then writes
    `_manifest.json`, removes the commit log and writes `_SUCCESS`, in that order.
    `abort()` drops buffered rows and temporary files and never writes `_SUCCESS`; complete
    part files stay. As a context manager: an exception aborts, a normal exit closes (the
    caller commits).

    `write_part(table, file)` writes one part's rows to a binary file (default: Parquet with
    `compression`), and `suffix` names its parts (`.parquet`, or `.jsonl`); `part_name(index)`
    names the index-th part (default `part_file_name(index, suffix)`, indices continuing after
    `existing_parts`).

    `entries()` are the part entries of this run's own parts (what their log records say);
    `commit_written_part(entry)` commits a part written by another writer (see the module
    docstring); `remove_uncommitted_parts()` deletes part files nothing commits.

    Its methods may be called from more than one thread (e.g. a timer calling `flush`).
    """

    def __init__(
        self,
        output_dir: OutputDirectory | str | os.PathLike[str],
        *,
        rows_per_file: int = 10_000,
        schema: pa.Schema | None = None,
        compression: str = "zstd",
        existing_parts: list[dict] | None = None,
        job_info: dict | None = None,
        write_part: Callable[[pa.Table, BinaryIO], None] | None = None,
        suffix: str = ".parquet",
        checkpoint_interval: int = DEFAULT_CHECKPOINT_INTERVAL,
        part_name: Callable[[int], str] | None = None,
    ) -> None:
        if rows_per_file < 1:
            raise ValueError(f"rows_per_file must be at least 1, got {rows_per_file}")
        self._owns_directory = isinstance(output_dir, (str, os.PathLike))
        self.directory = (OutputDirectory.open(output_dir) if self._owns_directory
                          else output_dir)
        self.output_dir = self.directory.path
        self.rows_per_file = rows_per_file
        self.schema = schema
        self.compression = compression
        self._write_rows = write_part or self._write_parquet
        self.suffix = suffix
        part_file_name(0, suffix)      # checks the suffix
        self._part_name = part_name or (lambda index: part_file_name(index, suffix))
        self.job_info = job_info
        self._existing_parts = list(existing_parts or [])
        self._first_index = 1 + max(
            (part_file_index(part["name"]) for part in self._existing_parts), default=-1)
        self._pending: list[pa.RecordBatch] = []
        self._pending_positions: list[np.ndarray] = []
        self._num_pending = 0
        self._part_files: list[Path] = []
        self._part_num_rows: list[int] = []
        self._part_input_rows: list[int] = []
        self._part_positions: list[list[list[int]] | None] = []
        self._part_counts: list[dict[str, int]] = []
        self._written_parts: list[dict] = []     # committed for other writers
        self._is_closed = False
        self._is_finished = False  # committed or aborted
        self._lock = threading.RLock()
        self._log: CommitLog | None = None
        if job_info is not None:
            self.directory.remove(SUCCESS_FILE)
            self._log = CommitLog(self.directory, fingerprint=job_info.get("fingerprint"),
                                  parts=self._existing_parts,
                                  checkpoint_interval=checkpoint_interval)
            # the log holds all the manifest said; a stale "complete" one must not outlive it
            self.directory.remove(MANIFEST_FILE)

    @property
    def num_rows_written(self) -> int:
        """Output rows in complete part files of this run (buffered rows not included), parts
        committed with `commit_written_part` included."""
        return sum(self._part_num_rows) + sum(
            part.get("num_output_rows", part["num_rows"]) for part in self._written_parts)

    @property
    def part_files(self) -> list[Path]:
        """Complete part files of this run, in the order they were written (then the parts
        committed with `commit_written_part`, in commit order)."""
        return self._part_files + [self.directory.path / part["name"]
                                   for part in self._written_parts]

    def entries(self, start: int = 0) -> list[dict]:
        """The part entries of this run's own complete parts from the `start`-th on, in the
        order they were written (name, `num_rows` input rows, `num_output_rows` when it
        differs, positions, counts)."""
        with self._lock:
            return [self._part_entry(index) for index in range(start, len(self._part_files))]

    def commit_written_part(self, entry: dict) -> None:
        """Commit the part file another writer wrote into this directory (`entry`: its
        `entries()` item): one commit-log record, as for this writer's own parts. The caller
        checks that its positions are not committed yet (`OutputTally.accept_part`). Raises
        ValueError when this is not a job's writer, it is closed, or `entry` names no part."""
        with self._lock:
            if self._log is None:
                raise ValueError("cannot commit a written part: this writer keeps no commit log")
            if self._is_closed:
                raise ValueError("cannot commit a written part: the writer is already closed")
            if not PART_FILE_PATTERN.fullmatch(str(entry.get("name"))):
                raise ValueError(f"not a part file entry: {entry!r}")
            self._log.append(entry)
            self._written_parts.append(dict(entry))

    def remove_uncommitted_parts(self) -> list[str]:
        """Delete the part files in the directory that no part entry of this writer names
        (earlier runs' parts, its own, those committed with `commit_written_part`): orphans
        of writers that never had their part committed. Returns the names removed. Call it
        once no other writer can still be writing (at the end of the job)."""
        with self._lock:
            named = {part["name"] for part in self._parts()}
            orphans = [name for name in self.directory.names()
                       if PART_FILE_PATTERN.fullmatch(name) and name not in named]
            for name in orphans:
                self.directory.remove(name)
            return orphans

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Add rows; writes every part file that fills up. A `POSITION_COLUMN` is stripped and
        recorded per part (see io/positions.py). Raises ValueError on a schema mismatch or
        after close/commit/abort."""
        with self._lock:
            self._write(batch)

    def _write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if self._is_closed:
            raise ValueError("cannot write: the writer is already closed")
        positions = None
        if POSITION_COLUMN in batch.schema.names:
            index = batch.schema.get_field_index(POSITION_COLUMN)
            positions = batch.column(index).to_numpy(zero_copy_only=False).astype(np.int64)
            batch = batch.drop_columns([POSITION_COLUMN])
        if self.schema is None:
            self.schema = batch.schema
        if not batch.schema.equals(self.schema):
            if batch.schema.names != self.schema.names:
                raise ValueError(
                    f"batch columns {batch.schema.names} do not match the output columns "
                    f"{self.schema.names}"
                )
            batch = batch.cast(self.schema)
        if batch.num_rows:
            table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
            self._pending.extend(table.to_batches())
            self._pending_positions.append(
                positions if positions is not None else np.full(batch.num_rows, -1, np.int64))
            self._num_pending += batch.num_rows
        while self._num_pending >= self.rows_per_file:
            self._write_part(self._part_end())

    def flush(self) -> None:
        """Write the buffered rows as a part file now (committed like any part); nothing when
        no row is buffered or the writer is closed. The buffer always ends at a position
        boundary (`write` takes all rows of a position at once), so a row's samples stay in
        one part."""
        with self._lock:
            if self._num_pending and not self._is_closed:
                self._write_part(self._num_pending)

    def _positions(self) -> np.ndarray:
        positions = (np.concatenate(self._pending_positions) if self._pending_positions
                     else np.empty(0, np.int64))
        self._pending_positions = [positions] if positions.size else []
        return positions

    def _part_end(self) -> int:
        """Where the next part ends: the last boundary between two positions within
        `rows_per_file` rows, else the first one after them (the end of the buffered rows is
        one: a batch holds all rows of its positions)."""
        positions = self._positions()
        # Row i starts a new group when its position differs from row i - 1's (or is unknown).
        starts = np.flatnonzero((positions[1:] != positions[:-1]) | (positions[1:] < 0)) + 1
        boundaries = np.append(starts, self._num_pending)
        within = boundaries[boundaries <= self.rows_per_file]
        return int(within[-1]) if within.size else int(boundaries[0])

    def _write_part(self, num_rows: int) -> None:
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        positions = self._positions()
        rest = table.slice(num_rows)
        self._pending = rest.combine_chunks().to_batches() if rest.num_rows else []
        self._pending_positions = [positions[num_rows:]] if rest.num_rows else []
        self._num_pending = rest.num_rows
        final_path = self.directory.write_atomically(
            self._part_name(self._first_index + len(self._part_files)),
            lambda file: self._write_rows(table.slice(0, num_rows), file))
        part_positions = positions[:num_rows]
        part = table.slice(0, num_rows)
        self._part_files.append(final_path)
        self._part_num_rows.append(num_rows)
        self._part_input_rows.append(count_input_rows(part))
        self._part_counts.append(part_counts(part))
        self._part_positions.append(
            IntervalSet.from_positions(part_positions).to_list()
            if part_positions.size and part_positions.min() >= 0 else None)
        if self._log is not None:   # the part is committed once the log names it
            self._log.append(self._part_entry(len(self._part_files) - 1))

    def _write_parquet(self, table: pa.Table, file: BinaryIO) -> None:
        pq.write_table(table, file, compression=self.compression)

    def _part_entry(self, index: int) -> dict:
        """The manifest / log entry of this run's `index`-th part."""
        input_rows, num_rows = self._part_input_rows[index], self._part_num_rows[index]
        # num_rows counts input rows (what the positions cover, what --resume skips)
        entry: dict = {"name": self._part_files[index].name, "num_rows": input_rows}
        if input_rows != num_rows:
            entry["num_output_rows"] = num_rows
        if self._part_positions[index] is not None:
            entry["positions"] = self._part_positions[index]
        return {**entry, **self._part_counts[index]}

    def _parts(self) -> list[dict]:
        return (self._existing_parts + [self._part_entry(i) for i in range(len(self._part_files))]
                + self._written_parts)

    def close(self) -> None:
        """Write the buffered rows as a last part file. Idempotent."""
        with self._lock:
            if self._is_closed:
                return
            if self._num_pending or (not self._part_files and not self._existing_parts
                                     and not self._written_parts
                                     and self.schema is not None):
                self._write_part(self._num_pending)
            self._is_closed = True

    def commit(self, manifest: dict) -> None:
        """Close, then write `_manifest.json` (`manifest`, status "complete", plus an "output"
        entry listing every part file with its row count and positions), remove the commit
        log (the manifest holds all it said) and finally write `_SUCCESS`, each atomically."""
        with self._lock:
            if self._is_finished:
                raise ValueError("cannot commit: the writer was already committed or aborted")
            if "output" in manifest:
                raise ValueError("the manifest key 'output' is reserved for the part file list")
            self.close()
            write_manifest(self.directory, {**(self.job_info or {}), **manifest,
                                            "status": "complete"}, self._parts())
            if self._log is not None:
                self._log.remove()
            self.directory.write_text(SUCCESS_FILE, "")
            self._is_finished = True
            self._close_own_directory()

    def abort(self) -> None:
        """Stop: drop buffered rows, remove temporary files, never write `_SUCCESS`."""
        with self._lock:
            self._pending, self._num_pending = [], 0
            self._is_closed = self._is_finished = True
            if not self.directory.is_open:
                return            # already finished and its own directory closed
            names = [self._part_name(self._first_index + len(self._part_files)),
                     MANIFEST_FILE, SUCCESS_FILE, *(self._log.temp_names() if self._log else ())]
            for name in names:  # only this writer's own temporary files
                self.directory.remove(temp_name_for(name))
            self._close_own_directory()

    def _close_own_directory(self) -> None:
        if self._owns_directory:
            self.directory.close()

    def __enter__(self) -> ParquetPartWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
