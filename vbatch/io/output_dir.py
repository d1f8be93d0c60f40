"""The job output directory: its file names, which paths may be used, the default path.

Layout of a finished job directory::

    part-00000.parquet  part-00001.parquet  ...   (at most rows_per_file rows each)
    _manifest.json                                 (the job's manifest plus the part list)
    _run_summary.json                              (counts, timings, plan, per-replica stats;
                                                    "_" so Parquet readers skip it)
    _SUCCESS                                       (empty; written last)

Every file is written under a hidden temporary name first (io/atomic.py), so a reader never
sees a half-written file, and a directory without `_SUCCESS` is an unfinished (crashed or
aborted) job. vbatch only ever deletes files with these names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vbatch.errors import VBatchUsageError
from vbatch.io.hf_inputs import hf_output_name, is_hf_uri
from vbatch.io.inputs import glob_base, is_glob

SUCCESS_FILE = "_SUCCESS"
MANIFEST_FILE = "_manifest.json"
SUMMARY_FILE = "_run_summary.json"
PART_FILE_PATTERN = re.compile(r"part-\d{5,}\.parquet")
#: The temporary names (io/atomic.py) of the files above.
TEMP_FILE_PATTERN = re.compile(
    r"\.(part-\d{5,}\.parquet|_manifest\.json|_run_summary\.json|_SUCCESS)\.tmp")


def part_file_name(index: int) -> str:
    """Name of the index-th part file: `part-00000.parquet`, `part-00001.parquet`, ..."""
    return f"part-{index:05d}.parquet"


def part_file_index(name: str) -> int:
    """The index of part file `name` (the inverse of `part_file_name`)."""
    return int(name.removeprefix("part-").removesuffix(".parquet"))


def _is_vbatch_file(name: str) -> bool:
    return (
        name in (SUCCESS_FILE, MANIFEST_FILE, SUMMARY_FILE)
        or PART_FILE_PATTERN.fullmatch(name) is not None
        or TEMP_FILE_PATTERN.fullmatch(name) is not None
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
    if is_glob(input):
        path = glob_base(path)
    elif not path.is_dir():
        return path.with_name(f"{path.stem}.vbatch")
    if path.name in ("", ".", ".."):
        path = Path(os.path.abspath(path))
    if not path.name:
        raise VBatchUsageError(f"cannot name an output directory after {input}; pass --output")
    return path.with_name(f"{path.name}.vbatch")
