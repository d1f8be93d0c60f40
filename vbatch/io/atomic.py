"""Atomic file writes: a reader sees either the old file or the whole new one, never a part.

The file is written under the hidden temporary name `.NAME.tmp` in the same directory,
fsync'd, renamed into place with `os.replace` (atomic within one filesystem), and then the
directory is fsync'd so the rename survives a crash. On any failure the temporary file is
removed and the final path is left as it was. Every file vbatch writes into a job directory
goes through `write_atomically`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def temp_path_for(final_path: Path) -> Path:
    """The temporary name `write_atomically` writes `final_path` under: `.NAME.tmp` beside it."""
    return final_path.with_name(f".{final_path.name}.tmp")


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


def write_atomically(final_path: Path, write: Callable[[Path], None]) -> Path:
    """Create `final_path` atomically: `write(temp_path)` writes the content to the temporary
    path, which is then fsync'd and renamed to `final_path` (replacing it), and the directory
    fsync'd. On any exception (also one raised by `write`) the temporary file is removed and
    the exception re-raised. Returns `final_path`."""
    final_path = Path(final_path)
    temp_path = temp_path_for(final_path)
    try:
        write(temp_path)
        with open(temp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp_path, final_path)
        _fsync_directory(final_path.parent)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return final_path


def write_text_atomically(final_path: Path, text: str) -> Path:
    """Write `text` to `final_path` atomically (see `write_atomically`). Returns the path."""
    return write_atomically(final_path, lambda temp_path: temp_path.write_text(text))


def write_json_atomically(final_path: Path, content: dict) -> Path:
    """Write `content` as JSON indented by 2 with a trailing newline to `final_path`
    atomically; values JSON cannot encode are written as strings. Returns the path."""
    return write_text_atomically(final_path, json.dumps(content, indent=2, default=str) + "\n")


def write_json_file(output_dir: str | os.PathLike[str], name: str, content: dict) -> Path:
    """Write `content` as indented JSON to `output_dir/name` atomically (temporary name, fsync,
    rename); values JSON cannot encode are written as strings. Returns the path."""
    return write_json_atomically(Path(output_dir) / name, content)
