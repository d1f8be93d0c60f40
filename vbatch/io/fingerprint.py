"""The job fingerprint: what must be unchanged for `--resume` to be safe, and what differs.

The fingerprint holds the input files' identities (path, size, modification time; for an
object in a store its URI, size, ETag and version or modification time as the store reports
them), the model identity, and every setting that changes which rows exist or what they
generate.
"""
from __future__ import annotations

import os
from pathlib import Path

from vbatch.io.input_file import InputFile, RemoteFile

#: fsspec `info()` keys that change when an object is rewritten: s3fs, gcsfs, adlfs spellings.
_OBJECT_VERSION_KEYS = {"etag": ("ETag", "etag"),
                        "version": ("VersionId", "generation", "version_id"),
                        "modified": ("LastModified", "updated", "last_modified", "mtime")}


def file_identity(path: InputFile) -> dict:
    """What identifies one input file's content cheaply: absolute path, size, mtime; for an
    object its URI, size and whichever of ETag, version and modification time the store
    gives (from the listing that found it, else asked of the store)."""
    if isinstance(path, RemoteFile):
        return _object_identity(path)
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns}


def _object_identity(file: RemoteFile) -> dict:
    info = file.info if file.info.get("size") is not None else file.fs.info(file.path)
    identity: dict = {"path": file.uri, "size": int(info["size"])}
    for name, keys in _OBJECT_VERSION_KEYS.items():
        value = next((info[key] for key in keys if info.get(key) not in (None, "")), None)
        if value is not None:
            identity[name] = str(value)
    return identity


def job_fingerprint(*, files: list[InputFile], model: dict, generation: dict,
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
            differences.append(f"input file {path} changed (size or modification time"
                               f"{', ETag' if 'etag' in after else ''})")
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
