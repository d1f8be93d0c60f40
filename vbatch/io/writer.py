"""Arrow batches -> a job directory of Parquet part files, committed atomically.

Layout of a finished job directory::

    part-00000.parquet  part-00001.parquet  ...   (at most rows_per_file rows each)
    _manifest.json                                 (the job's manifest plus the part list)
    _run_summary.json                              (counts, timings, plan, per-replica stats;
                                                    "_" so Parquet readers skip it)
    _SUCCESS                                       (empty; written last)

Each file is first written under a hidden temporary name in the same directory, fsync'd, then
renamed into place with `os.replace`, so a reader never sees a half-written part, and a
directory without `_SUCCESS` is an unfinished (crashed or aborted) job.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vbatch.errors import VBatchUsageError
from vbatch.io.positions import POSITION_COLUMN, IntervalSet
from vbatch.io.hf_inputs import hf_output_name, is_hf_uri

SUCCESS_FILE = "_SUCCESS"
MANIFEST_FILE = "_manifest.json"
SUMMARY_FILE = "_run_summary.json"
PART_FILE_PATTERN = re.compile(r"part-\d{5,}\.parquet")
_TEMP_FILE_PATTERN = re.compile(
    r"\.(part-\d{5,}\.parquet|_manifest\.json|_run_summary\.json|_SUCCESS)\.tmp")
_GLOB_CHARS = frozenset("*?[")


def _part_index(name: str) -> int:
    return int(name.removeprefix("part-").removesuffix(".parquet"))


def part_file_name(index: int) -> str:
    """Name of the index-th part file: `part-00000.parquet`, `part-00001.parquet`, ..."""
    return f"part-{index:05d}.parquet"


def _is_vbatch_file(name: str) -> bool:
    return (
        name in (SUCCESS_FILE, MANIFEST_FILE, SUMMARY_FILE)
        or PART_FILE_PATTERN.fullmatch(name) is not None
        or _TEMP_FILE_PATTERN.fullmatch(name) is not None
    )


def check_output_dir(path: str | os.PathLike[str], *, overwrite: bool,
                     resume: bool = False, root: str | os.PathLike[str] | None = None) -> Path:
    """Refuse an unusable output path without touching it (cheap: call it before any model
    loads): a path that resolves (symlinks and `..` followed) outside `root` when a root is
    configured, a file, a non-empty directory without `overwrite` or `resume`, or a directory
    holding files vbatch did not write. Returns the path. Raises VBatchUsageError (one line)."""
    output_dir = Path(path).expanduser()
    if root is not None:
        resolved_root = Path(root).expanduser().resolve()
        resolved = output_dir.resolve()
        if not resolved.is_relative_to(resolved_root):
            raise VBatchUsageError(f"output path {output_dir} resolves to {resolved}, outside "
                                   f"the output root {resolved_root} (--output-root / "
                                   "VBATCH_OUTPUT_ROOT)")
    if output_dir.exists() and not output_dir.is_dir():
        raise VBatchUsageError(f"output path {output_dir} is a file, not a directory")
    if output_dir.is_dir():
        names = sorted(entry.name for entry in output_dir.iterdir())
        if names and not (overwrite or resume):
            raise VBatchUsageError(
                f"output directory {output_dir} is not empty; pass --resume to continue the "
                "job that wrote it or --overwrite to replace it"
            )
        foreign = [
            name for name in names if not _is_vbatch_file(name) or (output_dir / name).is_dir()
        ]
        if foreign:
            raise VBatchUsageError(
                f"output directory {output_dir} holds files vbatch did not write "
                f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                "refusing to delete them: choose another --output"
            )
    return output_dir


def prepare_output_dir(path: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Create the output directory `path` (and its parents) and return it.

    An existing empty directory is used as is. A non-empty one is refused unless `overwrite`;
    then the files vbatch writes (part files, `_SUCCESS`, `_manifest.json`, temporary files)
    are removed, and the directory is refused if it holds anything else, so that no user data
    is ever deleted. Raises VBatchUsageError (one line) on every refusal.
    """
    output_dir = check_output_dir(path, overwrite=overwrite)
    if output_dir.is_dir():
        names = sorted(entry.name for entry in output_dir.iterdir())
        # _SUCCESS first, so an interrupted cleanup never leaves a "finished" partial job.
        for name in sorted(names, key=lambda name: name != SUCCESS_FILE):
            (output_dir / name).unlink()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise VBatchUsageError(f"cannot create output directory {output_dir}: {reason}") from None
    return output_dir


def default_output_dir(input: str) -> Path:
    """Where a job's output goes when `--output` is not given: `<name>.vbatch` next to the
    input. `data/x.jsonl` -> `data/x.vbatch`; directory `data/` -> `data.vbatch`; glob
    `data/*.parquet` -> `data.vbatch` (named after the glob's fixed directory); `hf://org/ds:test`
    -> `ds-test.vbatch` in the current directory."""
    if is_hf_uri(input):
        return Path(hf_output_name(input))
    path = Path(input).expanduser()
    if any(char in _GLOB_CHARS for char in input):
        fixed_parts: list[str] = []
        for part in path.parts[:-1]:
            if any(char in _GLOB_CHARS for char in part):
                break
            fixed_parts.append(part)
        path = Path(*fixed_parts) if fixed_parts else Path(".")
    elif not path.is_dir():
        return path.with_name(f"{path.stem}.vbatch")
    if path.name in ("", ".", ".."):
        path = Path(os.path.abspath(path))
    if not path.name:
        raise VBatchUsageError(f"cannot name an output directory after {input}; pass --output")
    return path.with_name(f"{path.name}.vbatch")


def _fsync_directory(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: directories cannot be opened; the rename is still atomic
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _replace_atomically(temp_path: Path, final_path: Path) -> None:
    with open(temp_path, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temp_path, final_path)
    _fsync_directory(final_path.parent)


def _temp_path(final_path: Path) -> Path:
    return final_path.with_name(f".{final_path.name}.tmp")


def write_json_file(output_dir: str | os.PathLike[str], name: str, content: dict) -> Path:
    """Write `content` as indented JSON to `output_dir/name` atomically (temporary name, fsync,
    rename); values JSON cannot encode are written as strings. Returns the path."""
    final_path = Path(output_dir) / name
    temp_path = _temp_path(final_path)
    try:
        temp_path.write_text(json.dumps(content, indent=2, default=str) + "\n")
        _replace_atomically(temp_path, final_path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return final_path


class ParquetPartWriter:
    """Buffer rows and write them as Parquet part files of at most `rows_per_file` rows into
    `output_dir` (created if missing; see `prepare_output_dir` for an existing one).

    `write()` takes record batches (or tables) with one schema (`schema`, or the first batch's;
    batches whose column names match are cast to it). `close()` writes the remaining rows (and,
    when no row was written at all, one empty part file so readers still see the schema).
    `commit(manifest)` closes, then writes `_manifest.json` and `_SUCCESS`, in that order.
    `abort()` drops buffered rows and temporary files and never writes `_SUCCESS`; complete
    part files stay. As a context manager: an exception aborts, a normal exit closes (the
    caller commits).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        rows_per_file: int = 10_000,
        schema: pa.Schema | None = None,
        compression: str = "zstd",
        existing_parts: list[dict] | None = None,
        job_info: dict | None = None,
    ) -> None:
        if rows_per_file < 1:
            raise ValueError(f"rows_per_file must be at least 1, got {rows_per_file}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_file = rows_per_file
        self.schema = schema
        self.compression = compression
        self.job_info = job_info
        self._existing_parts = list(existing_parts or [])
        self._first_index = 1 + max((_part_index(part["name"]) for part in self._existing_parts),
                                    default=-1)
        self._pending: list[pa.RecordBatch] = []
        self._pending_positions: list[np.ndarray] = []
        self._num_pending = 0
        self._part_files: list[Path] = []
        self._part_num_rows: list[int] = []
        self._part_positions: list[list[list[int]] | None] = []
        self._is_closed = False
        self._is_finished = False  # committed or aborted

    @property
    def num_rows_written(self) -> int:
        """Rows in complete part files of this run (buffered rows not included)."""
        return sum(self._part_num_rows)

    @property
    def part_files(self) -> list[Path]:
        """Complete part files of this run, in the order they were written."""
        return list(self._part_files)

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Add rows; writes every part file that fills up. A `POSITION_COLUMN` is stripped and
        recorded per part (see io/positions.py). Raises ValueError on a schema mismatch or
        after close/commit/abort."""
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
            self._write_part(self.rows_per_file)

    def _write_part(self, num_rows: int) -> None:
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        positions = (np.concatenate(self._pending_positions) if self._pending_positions
                     else np.empty(0, np.int64))
        rest = table.slice(num_rows)
        self._pending = rest.combine_chunks().to_batches() if rest.num_rows else []
        self._pending_positions = [positions[num_rows:]] if rest.num_rows else []
        self._num_pending = rest.num_rows
        final_path = self.output_dir / part_file_name(self._first_index + len(self._part_files))
        temp_path = _temp_path(final_path)
        try:
            pq.write_table(table.slice(0, num_rows), temp_path, compression=self.compression)
            _replace_atomically(temp_path, final_path)
        except BaseException:
            temp_path.unlink(missing_ok=True)
            raise
        part_positions = positions[:num_rows]
        self._part_files.append(final_path)
        self._part_num_rows.append(num_rows)
        self._part_positions.append(
            IntervalSet.from_positions(part_positions).to_list()
            if part_positions.size and part_positions.min() >= 0 else None)
        if self.job_info is not None:   # the part is committed once the manifest lists it
            self._write_manifest({**self.job_info, "status": "running"})

    def _parts(self) -> list[dict]:
        parts = list(self._existing_parts)
        for path, num_rows, positions in zip(self._part_files, self._part_num_rows,
                                             self._part_positions):
            entry = {"name": path.name, "num_rows": num_rows}
            if positions is not None:
                entry["positions"] = positions
            parts.append(entry)
        return parts

    def _write_manifest(self, manifest: dict) -> None:
        parts = self._parts()
        content = {**manifest, "output": {"num_rows": sum(p["num_rows"] for p in parts),
                                          "part_files": parts}}
        self._write_small_file(MANIFEST_FILE, json.dumps(content, indent=2, default=str) + "\n")

    def close(self) -> None:
        """Write the buffered rows as a last part file. Idempotent."""
        if self._is_closed:
            return
        if self._num_pending or (not self._part_files and not self._existing_parts
                                 and self.schema is not None):
            self._write_part(self._num_pending)
        self._is_closed = True

    def commit(self, manifest: dict) -> None:
        """Close, then write `_manifest.json` (`manifest`, status "complete", plus an "output"
        entry listing every part file with its row count and positions) and finally
        `_SUCCESS`, each atomically."""
        if self._is_finished:
            raise ValueError("cannot commit: the writer was already committed or aborted")
        if "output" in manifest:
            raise ValueError("the manifest key 'output' is reserved for the part file list")
        self.close()
        self._write_manifest({**(self.job_info or {}), **manifest, "status": "complete"})
        self._write_small_file(SUCCESS_FILE, "")
        self._is_finished = True

    def _write_small_file(self, name: str, text: str) -> None:
        final_path = self.output_dir / name
        _temp_path(final_path).write_text(text)
        _replace_atomically(_temp_path(final_path), final_path)

    def abort(self) -> None:
        """Stop: drop buffered rows, remove temporary files, never write `_SUCCESS`."""
        self._pending, self._num_pending = [], 0
        self._is_closed = self._is_finished = True
        names = (part_file_name(self._first_index + len(self._part_files)), MANIFEST_FILE,
                 SUCCESS_FILE)
        for name in names:  # only this writer's own temporary files
            _temp_path(self.output_dir / name).unlink(missing_ok=True)

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
