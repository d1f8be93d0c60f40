"""The job's input files as a Ray Data source (`InputDatasource`), read by vbatch's reader.

One read task per input file, streaming it with `reader.read_batches`, so the rows, their types
(unified across files) and the derived row keys (`<file>:<row>`) are exactly those of the
local runner; a Parquet file of several row groups is read as several tasks, each a range of
whole row groups of at least `batch_size` rows (`reader.read_row_groups`: the keys and
positions of a whole-file read; resume's skip of committed positions applies within each
range), so one huge file is not one task.

Where tasks run: when every input file is in an object store, on any node (each reaches the
store; the files travel as `RemoteFile`s, whose filesystems pickle); otherwise on the driver's
node, where the inputs were checked (other nodes need not see local files; a local Parquet
file is still split: more tasks, same node). Inputs on a filesystem every node shares are
treated as local.
"""
from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from vbatch.io.formats import parquet_row_group_rows
from vbatch.io.input_file import RemoteFile, default_root, file_size
from vbatch.io.openai_batch import is_openai_batch_schema
from vbatch.io.reader import InputScan, read_batches, read_row_groups
from vbatch.jobs.config import JobConfig


class InputDatasource(Datasource):
    """The job's input files as a Ray Data source: one read task per file, each streaming that
    file with `reader.read_batches` (same batches, schema and row keys as the local runner), or
    for a Parquet file one per range of whole row groups of at least `batch_size` rows
    (`reader.read_row_groups`)."""

    def __init__(self, config: JobConfig, job):
        super().__init__()
        self.config = config
        self.files = [path for path, schema in job.scan.file_schemas.items() if schema]
        self.file_schemas = job.scan.file_schemas
        # Positions number the files as the local reader does (io/positions.py).
        self.file_indices = {path: index for index, path in enumerate(job.scan.file_schemas)}
        self.skip = job.skip
        self.schema = job.scan.schema
        self.root = job.root if job.root is not None else default_root(self.files)

    @property
    def supports_distributed_reads(self) -> bool:
        """True when every input file is in an object store (any node reads it); else False:
        read on the driver's node, where the inputs were checked (other nodes need not see
        local files); blocks reach the replicas through Ray's object store."""
        return all(isinstance(path, RemoteFile) for path in self.files)

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(file_size(path) for path in self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None,
                       data_context=None) -> list[ReadTask]:
        tasks = []
        for path in self.files:
            ranges = self._row_group_ranges(path)
            size = file_size(path)
            if ranges is None:
                metadata = BlockMetadata(num_rows=None, size_bytes=size, exec_stats=None,
                                         input_files=[str(path)])
                tasks.append(ReadTask(self._reader(path), metadata, schema=self.schema,
                                      per_task_row_limit=per_task_row_limit))
                continue
            total = sum(num_rows for _, _, num_rows in ranges) or 1
            for groups, first_row, num_rows in ranges:
                metadata = BlockMetadata(num_rows=None, size_bytes=size * num_rows // total,
                                         exec_stats=None, input_files=[str(path)])
                tasks.append(ReadTask(self._range_reader(path, groups, first_row), metadata,
                                      schema=self.schema,
                                      per_task_row_limit=per_task_row_limit))
        return tasks

    def _row_group_ranges(self, path) -> list[tuple[list[int], int, int]] | None:
        """A Parquet file of more than one row group as (row groups, first row, rows) ranges
        of consecutive row groups, each of at least `batch_size` rows (the last may have
        fewer); None for any other file (read whole)."""
        if self.file_schemas[path] is None or is_openai_batch_schema(self.file_schemas[path]):
            return None
        group_rows = parquet_row_group_rows(path)
        if group_rows is None or len(group_rows) < 2:
            return None
        ranges, groups, first_row, num_rows = [], [], 0, 0
        for index, rows in enumerate(group_rows):
            groups.append(index)
            num_rows += rows
            if num_rows >= self.config.batch_size:
                ranges.append((groups, first_row, num_rows))
                first_row, groups, num_rows = first_row + num_rows, [], 0
        if groups:
            ranges.append((groups, first_row, num_rows))
        return ranges if len(ranges) > 1 else None

    def _range_reader(self, path, groups: list[int], first_row: int):
        config, root, skip = self.config, self.root, self.skip
        scan = InputScan({path: self.file_schemas[path]}, self.schema)
        file_index = self.file_indices[path]

        def read() -> Iterator[pa.Table]:
            for batch in read_row_groups(path, groups, first_row, scan=scan,
                                         file_index=file_index, batch_size=config.batch_size,
                                         id_column=config.id_column, root=root, skip=skip):
                yield pa.Table.from_batches([batch])
        return read

    def _reader(self, path):
        config, root, skip = self.config, self.root, self.skip
        scan = InputScan({path: self.file_schemas[path]}, self.schema)
        file_index = self.file_indices[path]

        def read() -> Iterator[pa.Table]:
            for batch in read_batches([path], batch_size=config.batch_size,
                                      prompt_column=config.prompt_column,
                                      id_column=config.id_column, root=root, scan=scan,
                                      with_positions=True, skip=skip,
                                      first_file_index=file_index):
                yield pa.Table.from_batches([batch])
        return read
