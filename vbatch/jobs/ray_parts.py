"""Ray replicas that write their own part files straight to the job's object-store output.

With an object-store `--output` (every node reaches it) a Ray replica actor writes the rows of
each block it finishes as part files of at most `rows_per_file` rows (a row's samples never
split, `ParquetPartWriter`'s rule) directly under the output prefix, and returns to the driver
only one small report per part: its part entry (name, input rows, output rows, positions,
error and token counts; what the commit log records) and the block's first error row, as JSON
text in the one column `PART_REPORT_COLUMN`. The driver never receives the rows, so the bytes
it receives grow with the number of parts, not with the data (`benchmarks/ray_driver_bytes.py`).

Exactly once: a replica writes under names unique to its attempt (`replica_part_file_name`:
replica index + a random token drawn per actor process + a sequence number), and a part is
committed only when the driver appends its entry to the commit log (io/parts.py
`commit_written_part`), after checking that none of its positions is committed already
(`OutputTally.accept_part`). A replica killed after writing a part but before its block
returned leaves a file the log never names: Ray Data replays the block on a restarted actor
(new token, new names, computed once more), and the orphan is deleted at the end of the job
(`ParquetPartWriter.remove_uncommitted_parts`) or by `--resume` (io/manifest.py). The replica
opens the prefix without the job's lock (the driver holds it for the job's life) and writes
nothing but part files.

A local `--output` keeps driver-side writing: a replica on another node cannot write the
driver's disk; so does `--preserve-order` (`writes_on_replicas`). `--output-format openai`
parts are written the same way (JSON lines, `write_output_lines`).
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from vbatch.io.object_store_dir import ObjectStoreDirectory
from vbatch.io.output_dir import replica_part_file_name
from vbatch.io.parts import ParquetPartWriter
from vbatch.io.schema import ERROR
from vbatch.jobs.config import JobConfig
from vbatch.jobs.openai_output import PART_SUFFIX, write_output_lines
from vbatch.storage.filesystem import open_location, parse_storage_options

#: The one column of a replica's output block in this mode: one JSON report per part written.
PART_REPORT_COLUMN = "__vbatch_part_report"
REPORT_SCHEMA = pa.schema([pa.field(PART_REPORT_COLUMN, pa.string())])


@dataclass(frozen=True)
class WrittenParts:
    """What a pool yields instead of output rows when its replicas wrote the parts: their
    reports ({"entry": part entry, "first_error": ...}), for the driver to commit."""

    reports: list[dict]

    @property
    def num_rows(self) -> int:
        """Input rows in the parts (what the progress bar counts)."""
        return sum(report["entry"]["num_rows"] for report in self.reports)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens in the parts."""
        return sum(report["entry"].get("num_output_tokens", 0) for report in self.reports)


def writes_on_replicas(config: JobConfig, output_dir: object) -> bool:
    """True when the replicas write the parts themselves: the output is an object-store prefix
    (a URI string, `JobInputs.output_dir`) and rows need not come out in input order. A local
    directory, or `--preserve-order` (parts in input order: only the driver sees that order),
    is written by the driver."""
    return isinstance(output_dir, str) and not config.preserve_order


def parse_reports(table: pa.Table) -> list[dict]:
    """The reports of a replica's output block: [{"entry": part entry, "first_error": str |
    None}, ...] in the order the parts were written."""
    return [json.loads(text) for text in table.column(PART_REPORT_COLUMN).to_pylist()]


class ReplicaPartWriter:
    """One replica's part writer over the job's output prefix `output_uri` (see module
    docstring). `write_block(table)` writes a finished block's output rows (with the hidden
    position column) as parts now and returns the reports table to send to the driver."""

    def __init__(self, config: JobConfig, output_uri: str, out_schema: pa.Schema,
                 replica_index: int):
        location = open_location(output_uri, parse_storage_options(config.storage_options))
        part_format = {}
        suffix = ".parquet"
        if config.output_format == "openai":
            part_format = {"write_part": write_output_lines}
            suffix = PART_SUFFIX
        token = secrets.token_hex(4)        # this attempt's: a restarted actor draws anew
        self._writer = ParquetPartWriter(
            ObjectStoreDirectory(location), rows_per_file=config.rows_per_file,
            schema=out_schema, suffix=suffix, **part_format,
            part_name=lambda index: replica_part_file_name(replica_index, token, index, suffix))
        self._id_column = config.id_column
        self.num_parts = 0

    def write_block(self, table: pa.Table) -> pa.Table:
        """Write `table` (a block's output rows, a row's samples adjacent) as part files at
        once; the reports of the parts written, one row each."""
        if not table.num_rows:
            return REPORT_SCHEMA.empty_table()
        self._writer.write(table)
        self._writer.flush()
        entries = self._writer.entries(self.num_parts)
        self.num_parts += len(entries)
        first_error = _first_error(table, self._id_column)
        reports = [json.dumps({"entry": entry, "first_error": first_error if i == 0 else None})
                   for i, entry in enumerate(entries)]
        return pa.table({PART_REPORT_COLUMN: pa.array(reports, pa.string())})


def _first_error(table: pa.Table, id_column: str) -> str | None:
    """"row <key>: <error>" of the first error row of `table`, or None."""
    if ERROR not in table.schema.names or table.column(ERROR).null_count == table.num_rows:
        return None
    row = pc.index(pc.is_valid(table.column(ERROR)), True).as_py()
    return f"row {table.column(id_column)[row].as_py()}: {table.column(ERROR)[row].as_py()}"
