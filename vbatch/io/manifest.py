"""The job manifest (`_manifest.json`): writing it, reading it back, and what a `--resume`
may skip.

The commit protocol: a part file is written under a hidden temporary name, fsync'd and renamed
into place (one PUT on an object store), and then the commit log (io/commit_log.py) records it,
with the positions of the rows it holds, in one small file per part; a part is committed once
the log names it. The log also holds the job fingerprint: input files (path, size, mtime), model
identity, and the settings that change what is generated. When the job finishes,
`_manifest.json` is written once (every part, status "complete"), the log removed, and
`_SUCCESS` written last.

On `--resume`, `load_resume_state` reads what was committed: a complete `_manifest.json` (it
lists everything the log did), else the commit log, else a manifest an earlier version kept
rewriting while it ran (status "running"). It refuses a different fingerprint (naming what
differs) unless forced, deletes part files nothing names (written by a run killed between the
part and its record; their rows are computed again), temporary files and log files the state
does not need, and returns the committed positions to skip and what those parts hold.

Every part entry records its rows' counts (`part_counts`: error rows, prompt and output
tokens), so a resumed job's counts and `--max-error-rate` cover the earlier runs' rows too.
A part's `num_rows` counts input rows (the positions it holds); with n > 1 samples a row it
holds more output rows, `num_output_rows` (written when it differs). A
manifest of an earlier version has no such counts: they are counted once from the committed
part files' columns (small Parquet reads) and recorded in the resumed run's log.
A manifest or log is validated (io/manifest_schema.py) before anything it names is touched.
Every file operation goes through the directory handle (io/directory.py or an object-store
one with the same methods).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vbatch.errors import VBatchUsageError
from vbatch.io.atomic import write_json_atomically
from vbatch.io.commit_log import is_log_file, read_log
from vbatch.io.directory import OutputDirectory
from vbatch.io.fingerprint import fingerprint_differences
from vbatch.io.manifest_schema import check_manifest
from vbatch.io.output_dir import MANIFEST_FILE, PART_FILE_PATTERN, SUCCESS_FILE
from vbatch.io.positions import IntervalSet
from vbatch.io.schema import ERROR, NUM_GENERATED_TOKENS, NUM_PROMPT_TOKENS, first_sample_mask

FINGERPRINT_KEY = "fingerprint"
#: Per-part counts in a part entry, and the output column each one sums.
PART_COUNT_COLUMNS = {"num_error_rows": ERROR, "num_prompt_tokens": NUM_PROMPT_TOKENS,
                      "num_output_tokens": NUM_GENERATED_TOKENS}


def write_manifest(output_dir: OutputDirectory | str | os.PathLike[str], manifest: dict,
                   parts: list[dict]) -> Path:
    """Write `output_dir/_manifest.json` atomically: `manifest` plus an "output" entry,
    {"num_rows": total input rows, "part_files": `parts`} (each part {"name", "num_rows"} and,
    when known, "positions", the `part_counts` and "num_output_rows"; "num_output_rows" is
    totalled too when a part has it); any "output" key of `manifest` is replaced.
    Returns the path."""
    output: dict = {"num_rows": sum(p["num_rows"] for p in parts)}
    if any("num_output_rows" in p for p in parts):
        output["num_output_rows"] = sum(p.get("num_output_rows", p["num_rows"]) for p in parts)
    content = {**manifest, "output": {**output, "part_files": parts}}
    if isinstance(output_dir, (str, os.PathLike)):
        return write_json_atomically(Path(output_dir) / MANIFEST_FILE, content)
    return output_dir.write_json(MANIFEST_FILE, content)    # a job's open directory handle


def read_manifest(directory: OutputDirectory) -> dict | None:
    """The manifest in the directory handle `directory`, or None if there is none. Raises
    VBatchUsageError if it cannot be parsed or is not shaped like a vbatch manifest
    (io/manifest_schema.py)."""
    path = directory.path / MANIFEST_FILE
    try:
        content = json.loads(directory.read_bytes(MANIFEST_FILE))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise VBatchUsageError(f"cannot resume: {path} is unreadable ({error})") from None
    return check_manifest(content, path)


def part_counts(table: pa.Table) -> dict[str, int]:
    """The per-part counts of the rows in `table`: error rows (non-null `error`; one output row
    each) and the sums of the token columns; a column the table lacks counts 0. Prompt tokens
    count once per input row (its first sample, `first_sample_mask`): n samples of a row share
    one prompt."""
    counts = {}
    first = first_sample_mask(table)
    for key, column in PART_COUNT_COLUMNS.items():
        if column not in table.schema.names:
            counts[key] = 0
        elif column == ERROR:
            counts[key] = table.num_rows - table.column(column).null_count
        elif not table.num_rows:
            counts[key] = 0
        else:
            values = table.column(column)
            if column == NUM_PROMPT_TOKENS and first is not None:
                values = values.filter(pa.array(first))
            counts[key] = int(pc.sum(values).as_py() or 0)
    return counts


def _count_part_file(directory: OutputDirectory, name: str, num_rows: int) -> dict[str, int]:
    """`part_counts` of the committed part `name` written without them (an earlier version,
    which wrote one output row per input row: `num_rows` is the file's row count)."""
    path = directory.path / name
    try:
        source = pa.BufferReader(directory.read_bytes(name))
        columns = set(pq.read_schema(source).names) & set(PART_COUNT_COLUMNS.values())
        table = pq.read_table(source, columns=sorted(columns))
    except (OSError, pa.ArrowException) as error:
        raise VBatchUsageError(f"cannot resume: committed part {path} is unreadable "
                               f"({error}); rerun with --overwrite") from None
    if table.num_rows != num_rows:
        raise VBatchUsageError(f"cannot resume: committed part {path} holds {table.num_rows} "
                               f"rows but the manifest lists {num_rows}; rerun with --overwrite")
    return part_counts(table)


@dataclass
class ResumeState:
    """What earlier runs of this job committed: the positions, the part entries (each with
    its `part_counts` when loaded by `load_resume_state`) and whether `_SUCCESS` was there."""

    committed: IntervalSet = field(default_factory=IntervalSet)
    parts: list[dict] = field(default_factory=list)
    was_complete: bool = False

    @property
    def num_committed_rows(self) -> int:
        """Input rows in the committed part files."""
        return sum(part["num_rows"] for part in self.parts)

    @property
    def num_output_rows(self) -> int:
        """Output rows in the committed part files (more than the input rows when a row was
        sampled n > 1 times)."""
        return sum(part.get("num_output_rows", part["num_rows"]) for part in self.parts)

    @property
    def num_error_rows(self) -> int:
        """Error rows in the committed part files."""
        return sum(part.get("num_error_rows", 0) for part in self.parts)

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens of the committed rows."""
        return sum(part.get("num_prompt_tokens", 0) for part in self.parts)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens of the committed rows."""
        return sum(part.get("num_output_tokens", 0) for part in self.parts)


def load_resume_state(output_dir: OutputDirectory | str | os.PathLike[str], fingerprint: dict,
                      *, force: bool) -> ResumeState:
    """Prepare the job directory `output_dir` (its handle; a path is opened for the call) for
    a resumed run of the job `fingerprint` (see module docstring).

    A missing or empty directory resumes from nothing. Raises VBatchUsageError when the
    manifest or log is malformed, the fingerprint differs (unless `force`), or a committed part
    is missing (or, without recorded counts, unreadable).
    """
    if isinstance(output_dir, (str, os.PathLike)):
        if not Path(output_dir).is_dir():
            return ResumeState()
        with OutputDirectory.open(output_dir) as directory:
            return load_resume_state(directory, fingerprint, force=force)
    directory = output_dir
    names = directory.names()
    manifest = read_manifest(directory) if MANIFEST_FILE in names else None
    # A complete manifest holds all the log said (the log goes after it is written).
    is_complete = manifest is not None and manifest.get("status") == "complete"
    log = None if is_complete else read_log(directory, names)
    if log is not None:
        old, parts, source = log.fingerprint, log.parts, "its commit log"
        unused = set(log.stale)
    else:
        manifest = manifest or {}
        old, source = manifest.get(FINGERPRINT_KEY), MANIFEST_FILE
        parts = [dict(part) for part in (manifest.get("output") or {}).get("part_files", [])]
        unused = {name for name in names if is_log_file(name)}
    if (log is not None or manifest) and old is None:
        raise VBatchUsageError(f"cannot resume: {directory.path} was written without a job "
                               "fingerprint; rerun with --overwrite")
    if old is not None and not force:
        differences = fingerprint_differences(old, fingerprint)
        if differences:
            raise VBatchUsageError(f"cannot resume {directory.path}: the job differs from the "
                                   f"run that wrote it ({'; '.join(differences[:4])}); pass "
                                   "--force to resume anyway or --overwrite to start over")
    listed = {part["name"] for part in parts}
    for name in names:
        is_orphan_part = PART_FILE_PATTERN.fullmatch(name) and name not in listed
        if is_orphan_part or name in unused or (name.startswith(".") and name.endswith(".tmp")):
            directory.remove(name)
    present = set(names)
    for part in parts:
        if part["name"] not in present:
            raise VBatchUsageError(f"cannot resume: committed part {part['name']} is missing "
                                   f"from {directory.path}; rerun with --overwrite")
        if "positions" not in part and part["num_rows"]:
            raise VBatchUsageError(f"cannot resume: {source} in {directory.path} does not "
                                   f"record which rows {part['name']} holds; rerun with "
                                   "--overwrite")
        if any(key not in part for key in PART_COUNT_COLUMNS):
            part.update(_count_part_file(directory, part["name"], part["num_rows"]))
    # All intervals merged at once (merging part by part costs parts x intervals).
    committed = IntervalSet(interval for part in parts for interval in part.get("positions", []))
    return ResumeState(committed=committed, parts=parts, was_complete=SUCCESS_FILE in present)
