"""The job manifest (`_manifest.json`): writing it, reading it back, and what a `--resume`
may skip.

The commit protocol (Hadoop's v1 committer, one level): a part file is written under a hidden
temporary name, fsync'd, renamed into place, and then `_manifest.json` is rewritten atomically
listing it, with the positions of the rows it holds; a part is committed once the manifest
lists it. The manifest also holds the job fingerprint: input files (path, size, mtime), model
identity, and the settings that change what is generated. `_SUCCESS` is written last.

On `--resume`, `load_resume_state` reads the manifest, refuses a different fingerprint (naming
what differs) unless forced, deletes part files the manifest does not list (written by a run
killed between the rename and the manifest update; their rows are computed again) and
temporary files, and returns the committed positions to skip.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vbatch.errors import VBatchUsageError
from vbatch.io.atomic import write_json_atomically
from vbatch.io.output_dir import MANIFEST_FILE, PART_FILE_PATTERN, SUCCESS_FILE
from vbatch.io.positions import IntervalSet

FINGERPRINT_KEY = "fingerprint"


def write_manifest(output_dir: str | os.PathLike[str], manifest: dict,
                   parts: list[dict]) -> Path:
    """Write `output_dir/_manifest.json` atomically: `manifest` plus an "output" entry,
    {"num_rows": total rows, "part_files": `parts`} (each part {"name", "num_rows"} and, when
    known, "positions"); any "output" key of `manifest` is replaced. Returns the path."""
    content = {**manifest, "output": {"num_rows": sum(p["num_rows"] for p in parts),
                                      "part_files": parts}}
    return write_json_atomically(Path(output_dir) / MANIFEST_FILE, content)


def read_manifest(output_dir: Path) -> dict | None:
    """The manifest of `output_dir`, or None if there is none. Raises VBatchUsageError if it
    cannot be parsed."""
    path = Path(output_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise VBatchUsageError(f"cannot resume: {path} is unreadable ({error})") from None


def file_identity(path: Path) -> dict:
    """What identifies one input file's content cheaply: absolute path, size, mtime."""
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns}


def job_fingerprint(*, files: list[Path], model: dict, generation: dict,
                    vbatch_version: str) -> dict:
    """The fingerprint of a job: resuming is only safe when it is unchanged. `generation`
    holds every setting that changes which rows exist or what they generate."""
    return {"input_files": [file_identity(path) for path in files], "model": model,
            "generation": generation, "vbatch_version": vbatch_version}


def fingerprint_differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two fingerprints (empty when equal)."""
    differences = []
    old_files = {f["path"]: f for f in old.get("input_files", [])}
    new_files = {f["path"]: f for f in new.get("input_files", [])}
    for path in sorted(old_files.keys() | new_files.keys()):
        before, after = old_files.get(path), new_files.get(path)
        if before is None:
            differences.append(f"input file {path} is new")
        elif after is None:
            differences.append(f"input file {path} is gone")
        elif before != after:
            differences.append(f"input file {path} changed (size or modification time)")
    if [f["path"] for f in old.get("input_files", [])] != \
            [f["path"] for f in new.get("input_files", [])] and not differences:
        differences.append("input file order changed")
    if old.get("model") != new.get("model"):
        differences.append(f"model {old.get('model')} -> {new.get('model')}")
    old_gen, new_gen = old.get("generation", {}), new.get("generation", {})
    for key in sorted(old_gen.keys() | new_gen.keys()):
        if old_gen.get(key) != new_gen.get(key):
            differences.append(f"{key} {old_gen.get(key)!r} -> {new_gen.get(key)!r}")
    if old.get("vbatch_version") != new.get("vbatch_version"):
        differences.append(f"vbatch version {old.get('vbatch_version')} -> "
                           f"{new.get('vbatch_version')}")
    return differences


@dataclass
class ResumeState:
    """What an earlier run of this job committed."""

    committed: IntervalSet = field(default_factory=IntervalSet)
    parts: list[dict] = field(default_factory=list)
    was_complete: bool = False

    @property
    def num_committed_rows(self) -> int:
        """Rows in the committed part files."""
        return sum(part["num_rows"] for part in self.parts)


def load_resume_state(output_dir: Path, fingerprint: dict, *, force: bool) -> ResumeState:
    """Prepare `output_dir` for a resumed run of the job `fingerprint` (see module docstring).

    A missing or empty directory resumes from nothing. Raises VBatchUsageError when the
    fingerprint differs (unless `force`) or a committed part is missing.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return ResumeState()
    manifest = read_manifest(output_dir) or {}
    old = manifest.get(FINGERPRINT_KEY)
    if manifest and old is None:
        raise VBatchUsageError(f"cannot resume: {output_dir} was written without a job "
                               "fingerprint; rerun with --overwrite")
    if old is not None and not force:
        differences = fingerprint_differences(old, fingerprint)
        if differences:
            raise VBatchUsageError(f"cannot resume {output_dir}: the job differs from the run "
                                   f"that wrote it ({'; '.join(differences[:4])}); pass --force "
                                   "to resume anyway or --overwrite to start over")
    parts = list(manifest.get("output", {}).get("part_files", []))
    listed = {part["name"] for part in parts}
    for entry in output_dir.iterdir():
        is_orphan_part = PART_FILE_PATTERN.fullmatch(entry.name) and entry.name not in listed
        if is_orphan_part or (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            entry.unlink()
    committed = IntervalSet()
    for part in parts:
        if not (output_dir / part["name"]).is_file():
            raise VBatchUsageError(f"cannot resume: committed part {part['name']} is missing "
                                   f"from {output_dir}; rerun with --overwrite")
        if "positions" not in part and part["num_rows"]:
            raise VBatchUsageError(f"cannot resume: {output_dir}/{MANIFEST_FILE} does not "
                                   f"record which rows {part['name']} holds; rerun with "
                                   "--overwrite")
        committed.update(IntervalSet(part.get("positions", [])))
    return ResumeState(committed=committed, parts=parts,
                       was_complete=(output_dir / SUCCESS_FILE).is_file())
