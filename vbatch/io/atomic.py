"""Atomic file writes: a reader sees either the old file or the whole new one, never a part.

The file is written under the hidden temporary name `.NAME.tmp` in the same directory (created
exclusively, so a link planted under that name is never followed), fsync'd, renamed into place
with `os.replace` (atomic within one filesystem), and then the directory is fsync'd so the
rename survives a crash. On any failure the temporary file is removed and the final name is
left as it was. Every step is relative to an open directory descriptor (`write_atomically_at`):
a job directory is written only through its `OutputDirectory` handle (io/directory.py), so a
path swapped for a symlink after the checks cannot redirect a write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def temp_name_for(name: str) -> str:
    """The temporary name a file `name` is written under: `.NAME.tmp`."""
    return f".{name}.tmp"


def fsync_directory(dir_fd: int) -> None:
    """fsync the open directory `dir_fd` (so renames in it survive a crash); filesystems that
    cannot fsync a directory are ignored."""
    try:
        os.fsync(dir_fd)
    except OSError:
        pass


def write_atomically_at(dir_fd: int, name: str, write: Callable[[BinaryIO], None]) -> None:
    """Create `name` in the open directory `dir_fd` atomically: `write(file)` writes the content
    to a binary file object of the temporary name, which is then fsync'd and renamed to `name`
    (replacing it), and the directory fsync'd. On any exception (also one raised by `write`)
    the temporary file is removed and the exception re-raised."""
    temp_name = temp_name_for(name)
    created = False
    try:
        handle = os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
        created = True
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        created = False
        fsync_directory(dir_fd)
    except BaseException:
        if created:
            try:
                os.unlink(temp_name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
        raise


def write_atomically(final_path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """`write_atomically_at` for a path: the parent directory is opened for the one write.
    Returns `final_path`. Job directories use their `OutputDirectory` handle instead."""
    final_path = Path(final_path)
    dir_fd = os.open(final_path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_atomically_at(dir_fd, final_path.name, write)
    finally:
        os.close(dir_fd)
    return final_path


def json_bytes(content: dict) -> bytes:
    """`content` as JSON indented by 2 with a trailing newline; values JSON cannot encode are
    written as strings."""
    return (json.dumps(content, indent=2, default=str) + "\n").encode()


def write_json_atomically(final_path: Path, content: dict) -> Path:
    """Write `content` as JSON (see `json_bytes`) to `final_path` atomically. Returns the
    path."""
    return write_atomically(final_path, lambda file: file.write(json_bytes(content)))
