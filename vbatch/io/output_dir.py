"""The job output directory: its file names, which paths may be used, the default path.

Layout of a finished job directory::

    part-00000.parquet  part-00001.parquet  ...   (at most rows_per_file rows each; with
                                                   --output-format openai part-00000.jsonl ...;
                                                   part-r0-<token>-00000.parquet ... when Ray
                                                   replicas write their own parts)
    _manifest.json                                 (the job's manifest plus the part list;
                                                    written once, when the job finishes)
    _run_summary.json                              (counts, timings, plan, per-replica stats;
                                                    "_" so Parquet readers skip it)
    _SUCCESS                                       (empty; written last)

While a job runs, the directory also holds `.vbatch.lock` (io/output_lock.py: one job at a
time; removed when the job ends) and, instead of `_manifest.json`, its commit log
(io/commit_log.py): `_checkpoint.<version>.json` (the whole state: fingerprint, committed
parts) and `_log.<version>.json` (one per part committed since; at most K of them), versions
zero-padded to 20 digits; a part is committed once the log names it. The finished job's
`_manifest.json` replaces the log. Every file is written under a hidden temporary name first
(io/atomic.py), so a reader never sees a half-written file, and a directory without `_SUCCESS`
is an unfinished (crashed or aborted) job. vbatch only ever deletes files with these names.
A job writes its directory only through an `OutputDirectory` handle (io/directory.py), opened
and locked by `locked_output_dir` before the model loads.

`--output` may also be an object-store prefix (`s3://bucket/out/`, `gs://`, `az://`/`abfs://`;
`file://` is a local path): the same names, checks and handle interface through an
`ObjectStoreDirectory` (io/object_store_dir.py: no temporary names, each object appears whole
with one upload) and its lock object (io/output_lock.py).
`--output-root` may be such a prefix too: an object-store output must then lie below it (key
prefix at a `/` boundary, same bucket and store); a local root refuses every object-store
output and an object-store root every local one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vbatch.errors import VBatchUsageError
from vbatch.io.directory import OutputDirectory, check_inside_root
from vbatch.io.hf_inputs import hf_output_name, is_hf_uri
from vbatch.io.inputs import glob_base, is_glob
from vbatch.io.object_store_dir import ObjectStoreDirectory, normalized_uri
from vbatch.io.output_lock import LOCK_FILE, ObjectStoreLock, OutputLock
from vbatch.storage.filesystem import OBJECT_STORE_SCHEMES, is_object_store_uri, uri_scheme

#: A job's output directory handle: on a local disk or below an object-store prefix.
JobDirectory = OutputDirectory | ObjectStoreDirectory

SUCCESS_FILE = "_SUCCESS"
MANIFEST_FILE = "_manifest.json"
SUMMARY_FILE = "_run_summary.json"
#: Part files: Parquet, or OpenAI batch output JSON lines (`--output-format openai`); named
#: `part-NNNNN.*` by the job's own writer, `part-rR-<token>-NNNNN.*` by a Ray replica that
#: writes its parts itself (`replica_part_file_name`: unique per replica attempt).
_PART_STEM = r"part-(?:\d{5,}|r\d+-[0-9a-f]{8}-\d{5,})"
PART_FILE_PATTERN = re.compile(_PART_STEM + r"\.(parquet|jsonl)")
PART_SUFFIXES = (".parquet", ".jsonl")
#: The commit log (io/commit_log.py): one record per committed part and, every K records, a
#: checkpoint of the whole state; both named by their zero-padded version.
LOG_RECORD_PATTERN = re.compile(r"_log\.(\d{20})\.json")
CHECKPOINT_PATTERN = re.compile(r"_checkpoint\.(\d{20})\.json")
#: The temporary names (io/atomic.py) of the files above.
TEMP_FILE_PATTERN = re.compile(
    r"\.(" + _PART_STEM + r"\.(parquet|jsonl)|_manifest\.json|_run_summary\.json|_SUCCESS"
    r"|_log\.\d{20}\.json|_checkpoint\.\d{20}\.json)\.tmp")
#: Created and removed again to check that a job's directory can be written.
WRITE_PROBE_FILE = ".vbatch.write-probe"
#: vbatch's files that say nothing about a job's output: never make a directory "not empty",
#: and never removed by `--overwrite` (the lock belongs to the job doing the overwriting).
_BOOKKEEPING_FILES = (LOCK_FILE, WRITE_PROBE_FILE)


def part_file_name(index: int, suffix: str = ".parquet") -> str:
    """Name of the index-th part file: `part-00000.parquet`, `part-00001.parquet`, ... (or
    `.jsonl` with that `suffix`)."""
    if suffix not in PART_SUFFIXES:
        raise ValueError(f"part files end in {' or '.join(PART_SUFFIXES)}, not {suffix!r}")
    return f"part-{index:05d}{suffix}"


def part_file_index(name: str) -> int:
    """The index of part file `name` (the inverse of `part_file_name`); -1 for a part a
    replica named (`replica_part_file_name`), which takes no index of the job's sequence."""
    stem = name.removeprefix("part-").split(".", 1)[0]
    return int(stem) if stem.isdigit() else -1


def replica_part_file_name(replica: int, token: str, index: int,
                           suffix: str = ".parquet") -> str:
    """Name of the index-th part file written by replica `replica` in its attempt `token` (8
    lowercase hex digits, random per replica process): `part-r1-0a1b2c3d-00000.parquet`. A
    restarted replica draws a new token, so no attempt ever writes over another's part."""
    if not re.fullmatch(r"[0-9a-f]{8}", token):
        raise ValueError(f"a replica's part token is 8 lowercase hex digits, not {token!r}")
    return f"part-r{replica}-{token}-{part_file_name(index, suffix).removeprefix('part-')}"


def _is_vbatch_file(name: str) -> bool:
    return (
        name in (SUCCESS_FILE, MANIFEST_FILE, SUMMARY_FILE, *_BOOKKEEPING_FILES)
        or PART_FILE_PATTERN.fullmatch(name) is not None
        or LOG_RECORD_PATTERN.fullmatch(name) is not None
        or CHECKPOINT_PATTERN.fullmatch(name) is not None
        or TEMP_FILE_PATTERN.fullmatch(name) is not None
    )


def output_path(path: str | os.PathLike[str]) -> Path | str:
    """`--output` as a job uses it: a local `Path` (a `file://` URI's too), or an object-store
    URI (a str, without its trailing slash). Raises VBatchUsageError for any other scheme."""
    text = str(path)
    scheme = uri_scheme(text)
    if scheme is None:
        return Path(text).expanduser()
    if scheme == "file":
        return Path(text[len("file://"):]).expanduser()
    if is_object_store_uri(text):
        return normalized_uri(text)
    raise VBatchUsageError(f"unsupported URI scheme {scheme}:// in --output {text}; use a local "
                           f"path or one of {', '.join(sorted(OBJECT_STORE_SCHEMES))}://")


def _store_and_key(uri: str) -> tuple[str, list[str]]:
    scheme, _, key = uri.partition("://")
    return OBJECT_STORE_SCHEMES[scheme.lower()][0], [part for part in key.split("/") if part]


def _check_root(output: Path | str, root: str | os.PathLike[str]) -> Path | str | None:
    """Refuse `output` outside `root` (see module docstring); returns the local root to check
    the opened directory against, or None for an object-store output."""
    root_path = output_path(root)
    if isinstance(output, Path) and isinstance(root_path, Path):
        check_inside_root(output, root_path)
        return root_path
    if isinstance(output, str) and isinstance(root_path, str):
        store, key = _store_and_key(output)
        root_store, root_key = _store_and_key(root_path)
        if store == root_store and key[:len(root_key)] == root_key:
            return None
    raise VBatchUsageError(f"output path {output} is outside the output root {root} "
                           "(--output-root / VBATCH_OUTPUT_ROOT)")


def check_output_dir(path: str | os.PathLike[str], *, overwrite: bool,
                     resume: bool = False, root: str | os.PathLike[str] | None = None,
                     storage_options: dict[str, Any] | None = None) -> Path | str:
    """Refuse an unusable output path without touching it (cheap: call it before any model
    loads): a path that resolves (symlinks and `..` followed) outside `root` when a root is
    configured, a file, a non-empty directory without `overwrite` or `resume`, or a directory
    holding files vbatch did not write. An object-store prefix (`storage_options` for its
    filesystem) is listed the same way, which also refuses a missing bucket, denied access or
    an unreachable endpoint. Returns `output_path(path)`. Raises VBatchUsageError (one line)."""
    output_dir = output_path(path)
    if root is not None:
        _check_root(output_dir, root)
    if isinstance(output_dir, str):
        with ObjectStoreDirectory.open(output_dir, storage_options) as directory:
            _check_contents(directory.path, directory.names(), directory.is_regular_file,
                            may_hold_a_job=overwrite or resume)
        return output_dir
    if output_dir.exists() and not output_dir.is_dir():
        raise VBatchUsageError(f"output path {output_dir} is a file, not a directory")
    if output_dir.is_dir():
        _check_contents(output_dir, sorted(entry.name for entry in output_dir.iterdir()),
                        lambda name: (output_dir / name).is_file(), may_hold_a_job=overwrite
                        or resume)
    return output_dir


def _check_contents(display: object, names: list[str], is_file: Callable[[str], bool], *,
                    may_hold_a_job: bool) -> list[str]:
    """Refuse a directory holding a job unless `may_hold_a_job`, and one holding anything
    vbatch did not write; returns the names of the job's files (bookkeeping files left out)."""
    names = [name for name in names if name not in _BOOKKEEPING_FILES]
    if names and not may_hold_a_job:
        raise VBatchUsageError(
            f"output directory {display} is not empty; pass --resume to continue the job "
            "that wrote it or --overwrite to replace it")
    foreign = [name for name in names if not _is_vbatch_file(name) or not is_file(name)]
    if foreign:
        raise VBatchUsageError(
            f"output directory {display} holds files vbatch did not write "
            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
            "refusing to delete them: choose another --output")
    return names


def prepare_output_dir(path: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Create the output directory `path` (and its parents) and return it; an existing one is
    checked and cleared as `clear_output_dir` does. Raises VBatchUsageError (one line) on every
    refusal. (A job does this through its locked handle: `clear_output_dir`.)"""
    output_dir = check_output_dir(path, overwrite=overwrite)
    with OutputDirectory.open(output_dir) as directory:
        clear_output_dir(directory, overwrite=overwrite)
    return output_dir


def clear_output_dir(directory: JobDirectory, *, overwrite: bool) -> None:
    """Make the open `directory` ready for a new job. An empty directory is used as is. A
    non-empty one is refused unless `overwrite`; then the files vbatch writes (part files,
    `_SUCCESS`, `_manifest.json`, the commit log, temporary files) are removed, and the
    directory is refused if it holds anything else, so that no user data is ever deleted. The
    lock file stays. Raises VBatchUsageError (one line) on every refusal."""
    names = _check_contents(directory.path, directory.names(), directory.is_regular_file,
                            may_hold_a_job=overwrite)
    # _SUCCESS first, so an interrupted cleanup never leaves a "finished" partial job.
    for name in sorted(names, key=lambda name: name != SUCCESS_FILE):
        directory.remove(name)


@contextmanager
def locked_output_dir(path: str | os.PathLike[str], *,
                      root: str | os.PathLike[str] | None = None,
                      storage_options: dict[str, Any] | None = None) -> Iterator[JobDirectory]:
    """The output directory of a job that will write it, for the job's whole life: created if
    missing, held open (and, with `root`, the opened directory checked to be inside it), locked
    against a second job (io/output_lock.py), and checked to be writable (a probe file created
    and removed), all before any model loads. Yields the handle every write goes through; on
    exit the lock is released, a directory created here and left empty removed again, and the
    handle closed. An object-store prefix (`storage_options` for its filesystem) yields an
    `ObjectStoreDirectory` locked by its lock object. Raises VBatchUsageError (one line)."""
    output_dir = output_path(path)
    local_root = None if root is None else _check_root(output_dir, root)
    if isinstance(output_dir, str):
        directory: JobDirectory = ObjectStoreDirectory.open(output_dir, storage_options)
    else:
        directory = OutputDirectory.open(output_dir, root=local_root)
    with directory:
        lock = (ObjectStoreLock if isinstance(directory, ObjectStoreDirectory)
                else OutputLock).acquire(directory)
        try:
            directory.check_writable(WRITE_PROBE_FILE)
            yield directory
        finally:
            lock.release()
            directory.remove_if_unused()


def default_output_dir(input: str) -> Path:
    """Where a job's output goes when `--output` is not given: `<name>.vbatch` next to the
    input. `data/x.jsonl` -> `data/x.vbatch`; directory `data/` -> `data.vbatch`; glob
    `data/*.parquet` -> `data.vbatch` (named after the glob's fixed directory); `hf://org/ds:test`
    -> `ds-test.vbatch` in the current directory; `file:///data/x.jsonl` -> `/data/x.vbatch`.
    An object-store INPUT has no default (VBatchUsageError: pass --output)."""
    if is_hf_uri(input):
        return Path(hf_output_name(input))
    if is_object_store_uri(input):
        raise VBatchUsageError(f"INPUT {input} is in an object store: pass --output (a local "
                               "directory or an s3://, gs://, az:// prefix) for the results")
    if uri_scheme(input) == "file":
        input = input[len("file://"):]
    path = Path(input).expanduser()
    if is_glob(input):
        path = glob_base(path)
    elif not path.is_dir():
        return path.with_name(f"{path.stem}.vbatch")
    if path.name in ("", ".", ".."):
        path = Path(os.path.abspath(path))
    if not path.name:
        raise VBatchUsageError(f"cannot name an output directory after {input}; pass --output")
    return path.with_name(f"{path.name}.vbatch")
