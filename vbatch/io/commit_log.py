"""The commit log: a running job records each committed part at a constant cost.

Delta Lake's `_delta_log` idea, kept flat in the job directory (names start with `_`, so
pyarrow, Spark and Ray skip them when reading the parts; no subdirectory, which object stores
do not have anyway)::

    _checkpoint.00000000000000000000.json   the whole state as of version 0
    _log.00000000000000000001.json          one record per committed part: version 1
    _log.00000000000000000002.json          version 2, ...

Versions count up from 0, zero-padded to 20 digits so the names sort in version order. A record
(version v) is one line of JSON::

    {"log_format": 1, "version": v, "add": [<part entry>]}

where a part entry is exactly what `_manifest.json` lists under "output.part_files" (name,
`num_rows` input rows, `num_output_rows` when it differs, `positions` [[start, end), ...],
`num_error_rows`, `num_prompt_tokens`, `num_output_tokens`). A checkpoint at version v holds
the state after every version <= v::

    {"log_format": 1, "version": v, "fingerprint": {...}, "num_parts": P, "num_rows": N,
     "num_output_rows": M, "committed": [[start, end], ...],
     "part_columns": ["name", "num_rows", "num_output_rows", "positions", "num_error_rows",
                      "num_prompt_tokens", "num_output_tokens"],
     "part_rows": [["part-00000.parquet", 4, null, [[0, 4]], 0, 31, 96], ...]}

`committed` holds the merged positions of all its parts, `num_rows`/`num_output_rows` the
totals; each part entry is one row of `part_columns` (null: the entry has no such key), half
the size of the entry as an object, so a checkpoint of 100,000 parts is ~8 MB to write.

Protocol, for the one writer the directory's lock allows (io/output_lock.py):

- `CommitLog(...)` starts by writing a checkpoint at the next free version holding the job
  fingerprint and the parts earlier runs committed, then removes older log files;
- a part file is written first, then `append` writes the record naming it: a part is committed
  once a record (or checkpoint) names it; a part file nothing names is garbage, removed on
  resume (io/manifest.py `load_resume_state`);
- after every `checkpoint_interval` (K) records, a checkpoint of the whole state is written,
  then the records it covers and the previous checkpoint are removed, so the directory holds at
  most K records and one checkpoint (two for a moment). A crash in between leaves files that
  the newest checkpoint covers; readers ignore them and the next resume removes them.

Every file is created once, under its version's name (a name already there is refused, never
overwritten), and appears whole (`write_atomically`: a temporary name, fsync and rename on a
local disk; one PUT on an object store), so a half-written record or checkpoint never exists
under its final name. `read_log` reads the newest checkpoint and the records after it, which
must follow it without a gap.

Cost: a record is one small file, whatever the job's size. A checkpoint is O(parts) but comes
every K commits, and each part's row is encoded to JSON once, when it commits, appended to one
buffer, so writing a checkpoint is a single write of that buffer. The merged positions are
merged as parts commit (their size is the number of gaps in what is committed, not the number
of parts). All I/O goes through the
directory handle (`names`, `read_bytes`, `write_atomically`, `exists`, `remove`), so the same
code runs on a local directory (io/directory.py) and on an object-store prefix.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vbatch.errors import VBatchUsageError
from vbatch.io.directory import OutputDirectory
from vbatch.io.manifest_schema import (
    check_checkpoint,
    check_log_parts,
    check_log_record,
    check_part_entries,
)
from vbatch.io.output_dir import CHECKPOINT_PATTERN, LOG_RECORD_PATTERN
from vbatch.io.positions import IntervalSet

LOG_FORMAT = 1
#: The keys of a part entry, in the order of a checkpoint's rows.
PART_COLUMNS = ("name", "num_rows", "num_output_rows", "positions", "num_error_rows",
                "num_prompt_tokens", "num_output_tokens")
DEFAULT_CHECKPOINT_INTERVAL = 100
_READ_ATTEMPTS = 5


def record_name(version: int) -> str:
    """The name of the record of `version`: `_log.00000000000000000042.json`."""
    return f"_log.{version:020d}.json"


def checkpoint_name(version: int) -> str:
    """The name of the checkpoint of `version`: `_checkpoint.00000000000000000042.json`."""
    return f"_checkpoint.{version:020d}.json"


def is_log_file(name: str) -> bool:
    """True for a record or checkpoint name."""
    return bool(LOG_RECORD_PATTERN.fullmatch(name) or CHECKPOINT_PATTERN.fullmatch(name))


def _versions(names: Iterable[str], pattern) -> dict[int, str]:
    found = {}
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            found[int(match.group(1))] = name
    return found


def part_output_rows(part: dict) -> int:
    """The output rows of a part entry (its input rows unless it says otherwise)."""
    return part.get("num_output_rows", part["num_rows"])


@dataclass
class LogState:
    """What the log says: the last version applied, the fingerprint, the committed parts (in
    commit order), and `stale`: log files the state does not need (covered by its
    checkpoint)."""

    version: int
    fingerprint: dict | None
    parts: list[dict] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)


def _parse(directory, name: str) -> object:
    try:
        return json.loads(directory.read_bytes(name))
    except ValueError as error:
        raise VBatchUsageError(f"cannot resume: {directory.path}/{name} is unreadable "
                               f"({error}); rerun with --overwrite") from None


def read_log(directory, names: list[str] | None = None) -> LogState | None:
    """The state of the commit log in `directory` (a directory handle; `names`: its listing,
    when the caller has it), or None when it holds no log file. Touches nothing. Raises
    VBatchUsageError when the log is malformed (io/manifest_schema.py), has records but no
    checkpoint, or misses a version after its checkpoint."""
    names = directory.names() if names is None else names
    checkpoints = _versions(names, CHECKPOINT_PATTERN)
    records = _versions(names, LOG_RECORD_PATTERN)
    if not checkpoints and not records:
        return None
    if not checkpoints:
        raise VBatchUsageError(f"cannot resume: the commit log in {directory.path} has no "
                               "checkpoint; rerun with --overwrite")
    version = max(checkpoints)
    name = checkpoints[version]
    checkpoint = check_checkpoint(_parse(directory, name), f"{directory.path}/{name}")
    if checkpoint["version"] != version:
        raise VBatchUsageError(f"cannot resume: {directory.path}/{name} says version "
                               f"{checkpoint['version']}; rerun with --overwrite")
    parts = _part_entries(checkpoint, f"{directory.path}/{name}")
    if IntervalSet(interval for part in parts for interval in part.get("positions") or []
                   ).to_list() != checkpoint["committed"]:
        raise VBatchUsageError(f"cannot resume: {directory.path}/{name}: its committed "
                               "positions are not those of its parts; rerun with --overwrite")
    stale = [checkpoints[v] for v in checkpoints if v < version]
    stale += [records[v] for v in records if v <= version]
    for later in sorted(v for v in records if v > version):
        if later != version + 1:
            raise VBatchUsageError(f"cannot resume: the commit log in {directory.path} misses "
                                   f"{record_name(version + 1)}; rerun with --overwrite")
        record = check_log_record(_parse(directory, records[later]),
                                  f"{directory.path}/{records[later]}")
        if record["version"] != later:
            raise VBatchUsageError(f"cannot resume: {directory.path}/{records[later]} says "
                                   f"version {record['version']}; rerun with --overwrite")
        parts.extend(record["add"])
        version = later
    check_log_parts(parts, str(directory.path))
    return LogState(version=version, fingerprint=checkpoint.get("fingerprint"), parts=parts,
                    stale=stale)


def committed_parts(directory: OutputDirectory | str | os.PathLike[str]) -> list[dict]:
    """The part entries the commit log of a job directory names so far (a handle, or a path:
    opened for the call), [] when there is none; for watching a running job. A log file the
    writer removes while it is read (a checkpoint replaced it) makes it read again."""
    if isinstance(directory, (str, os.PathLike)):
        if not Path(directory).is_dir():
            return []
        with OutputDirectory.open(directory) as handle:
            return committed_parts(handle)
    for _ in range(_READ_ATTEMPTS - 1):
        try:
            state = read_log(directory)
        except FileNotFoundError:
            continue
        return state.parts if state else []
    state = read_log(directory)
    return state.parts if state else []


def _part_entries(checkpoint: dict, where: str) -> list[dict]:
    """The part entries of a checkpoint's rows, checked (io/manifest_schema.py)."""
    columns = checkpoint["part_columns"]
    if tuple(columns) != PART_COLUMNS:
        raise VBatchUsageError(f"cannot resume: {where} is not a vbatch commit log file: "
                               f"part_columns should be {list(PART_COLUMNS)}")
    parts = []
    for index, row in enumerate(checkpoint["part_rows"]):
        if len(row) != len(columns):
            raise VBatchUsageError(f"cannot resume: {where} is not a vbatch commit log file: "
                                   f"part_rows[{index}] should hold {len(columns)} values")
        parts.append({key: value for key, value in zip(columns, row) if value is not None})
    return check_part_entries(parts, where)


def _encode(content: object) -> bytes:
    return json.dumps(content, separators=(",", ":"), default=str).encode()


class CommitLog:
    """The writer of `directory`'s commit log (see the module docstring). Construction writes
    the starting checkpoint: `fingerprint` and the parts earlier runs committed (`parts`, as
    `load_resume_state` returned them), at the version after any log file already there, and
    removes the older log files. `append(part)` commits one part entry; every
    `checkpoint_interval` records a checkpoint follows. `remove()` removes the log (after the
    final `_manifest.json` holds everything it said)."""

    def __init__(self, directory, *, fingerprint: dict, parts: Iterable[dict] = (),
                 checkpoint_interval: int = DEFAULT_CHECKPOINT_INTERVAL) -> None:
        if checkpoint_interval < 1:
            raise ValueError(f"checkpoint_interval must be at least 1, got "
                             f"{checkpoint_interval}")
        self.directory = directory
        self.checkpoint_interval = checkpoint_interval
        self._fingerprint = _encode(fingerprint)
        self._num_parts = 0
        self._rows = bytearray()     # the checkpoint's part rows, comma-separated
        self._committed = IntervalSet()
        self._num_rows = self._num_output_rows = 0
        intervals = []
        for part in parts:
            self._add(part, merge=False)
            intervals.extend(part.get("positions") or [])
        self._committed = IntervalSet(intervals)
        older = [name for name in directory.names() if is_log_file(name)]
        self.version = 1 + max((int(name.split(".")[1]) for name in older), default=-1)
        self._checkpoint_version = self.version
        self._records: list[str] = []       # the records written since the last checkpoint
        self._write_checkpoint()
        for name in older:
            directory.remove(name)

    @property
    def num_parts(self) -> int:
        """Parts the log names."""
        return self._num_parts

    def append(self, part: dict) -> None:
        """Commit the part entry `part` (its file is already written): write the next record,
        and a checkpoint when `checkpoint_interval` records have been written since the last
        one."""
        entry = self._add(part, merge=True)
        self.version += 1
        name = record_name(self.version)
        record = b'{"log_format":%d,"version":%d,"add":[%s]}\n' % (LOG_FORMAT, self.version,
                                                                   entry)
        self._create(name, record)
        self._records.append(name)
        if len(self._records) >= self.checkpoint_interval:
            self._checkpoint()

    def _add(self, part: dict, *, merge: bool) -> bytes:
        entry = _encode(part)
        if self._num_parts:
            self._rows += b","
        self._rows += _encode([part.get(key) for key in PART_COLUMNS])
        self._num_parts += 1
        self._num_rows += part["num_rows"]
        self._num_output_rows += part_output_rows(part)
        if merge and part.get("positions"):
            self._committed.update(IntervalSet(part["positions"]))
        return entry

    def _checkpoint(self) -> None:
        previous = checkpoint_name(self._checkpoint_version)
        self._checkpoint_version = self.version
        self._write_checkpoint()
        for name in self._records:      # covered by the checkpoint now
            self.directory.remove(name)
        self._records = []
        self.directory.remove(previous)

    def _write_checkpoint(self) -> None:
        head = (b'{"log_format":%d,"version":%d,"fingerprint":%s,"num_parts":%d,"num_rows":%d,'
                b'"num_output_rows":%d,"committed":%s,"part_columns":%s,"part_rows":['
                % (LOG_FORMAT, self.version, self._fingerprint, self._num_parts,
                   self._num_rows, self._num_output_rows, _encode(self._committed.to_list()),
                   _encode(PART_COLUMNS)))
        self._create(checkpoint_name(self.version), head, self._rows, b"]}\n")

    def _create(self, name: str, *chunks: bytes | bytearray) -> None:
        # The lock makes this the only writer; the check keeps a bug from replacing history.
        if self.directory.exists(name):
            raise RuntimeError(f"commit log file {name} exists already; refusing to replace it")

        def write(file) -> None:
            for chunk in chunks:
                file.write(chunk)
        self.directory.write_atomically(name, write)

    def temp_names(self) -> list[str]:
        """The names of the log files this writer may be writing next (for an abort's cleanup
        of temporary files)."""
        return [record_name(self.version + 1), checkpoint_name(self.version),
                checkpoint_name(self.version + 1)]

    def remove(self) -> None:
        """Remove the records and checkpoint of this log (the records first: a crash in
        between leaves a checkpoint that covers them)."""
        for name in self._records:
            self.directory.remove(name)
        self._records = []
        self.directory.remove(checkpoint_name(self._checkpoint_version))
