"""`OutputDirectory`: an output directory held open, the one way vbatch touches its files.

A path is checked once (e.g. against `--output-root`), but a path can change after the check:
a directory swapped for a symlink while the model loads would send every later write
elsewhere. So the directory is opened (`O_DIRECTORY`), the *opened* directory is checked
against the root, and every later write, rename, unlink, listing and fsync is relative to
that descriptor (`dir_fd=`). Whatever happens to the path afterwards, the job writes into
the directory it checked, or nowhere.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from vbatch.errors import VBatchUsageError
from vbatch.io.atomic import json_bytes, write_atomically_at


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _opened_path(fd: int) -> Path | None:
    """Where the open directory `fd` is now (Linux: its /proc magic link), or None."""
    link = f"/proc/self/fd/{fd}"
    return Path(os.path.realpath(link)) if os.path.islink(link) else None


def _outside_root(path: Path, resolved: Path, root: Path) -> VBatchUsageError:
    return VBatchUsageError(f"output path {path} resolves to {resolved}, outside the output "
                            f"root {root} (--output-root / VBATCH_OUTPUT_ROOT)")


def check_inside_root(path: Path, root: str | os.PathLike[str]) -> Path:
    """Refuse `path` unless it resolves (symlinks and `..` followed) inside `root`; returns
    the resolved root. Raises VBatchUsageError (one line)."""
    resolved_root = Path(root).expanduser().resolve()
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_relative_to(resolved_root):
        raise _outside_root(path, resolved, resolved_root)
    return resolved_root


class OutputDirectory:
    """An open directory: `path` is kept for messages only; every file operation is relative
    to the descriptor `fd`. Close it (or use it as a context manager) when done."""

    def __init__(self, path: Path, fd: int, *, created: bool = False) -> None:
        self.path = path
        self.fd = fd
        self.created = created   # `open` made it (so an unused one can go again)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *,
             root: str | os.PathLike[str] | None = None) -> OutputDirectory:
        """Create `path` (and its parents) if missing, open it, and, with a `root`, refuse it
        unless the opened directory lies inside the resolved root. Raises VBatchUsageError
        (one line) when it cannot be created or opened or is outside the root."""
        path = Path(path).expanduser()
        # checked again before mkdir, which would create directories through a symlink
        resolved_root = None if root is None else check_inside_root(path, root)
        try:
            created = not path.is_dir()
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as error:
            raise VBatchUsageError(
                f"cannot create output directory {path}: {_reason(error)}") from None
        directory = cls(path, fd, created=created)
        if resolved_root is not None:
            try:
                directory._check_inside(resolved_root)
            except BaseException:
                directory.close()
                raise
        return directory

    def _check_inside(self, root: Path) -> None:
        opened = _opened_path(self.fd)
        if opened is None:    # no /proc: the opened directory must be the one the path names
            opened = self.path.resolve()
            if not os.path.samestat(os.fstat(self.fd), os.stat(opened)):
                raise VBatchUsageError(f"output directory {self.path} changed while it was "
                                       "opened; refusing to write into it")
        if not opened.is_relative_to(root):
            raise _outside_root(self.path, opened, root)

    def check_path_unchanged(self) -> None:
        """Refuse to go on (VBatchUsageError) when `path` no longer names the open directory
        (replaced, e.g. by a symlink, since it was opened); for code that works on the path."""
        try:
            unchanged = os.path.samestat(os.fstat(self.fd), os.stat(self.path))
        except OSError:
            unchanged = False
        if not unchanged:
            raise VBatchUsageError(f"output directory {self.path} was moved or replaced while "
                                   "the job started; refusing to write elsewhere")

    def check_writable(self, probe_name: str) -> None:
        """Create and remove the file `probe_name`; raises VBatchUsageError naming the
        directory when that fails (read-only filesystem, no permission)."""
        try:
            fd = os.open(probe_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644,
                         dir_fd=self.fd)
            os.close(fd)
            os.unlink(probe_name, dir_fd=self.fd)
        except OSError as error:
            raise VBatchUsageError(f"output directory {self.path} is not writable: "
                                   f"{_reason(error)}") from None

    def names(self) -> list[str]:
        """The names in the directory, sorted."""
        return sorted(os.listdir(self.fd))

    def exists(self, name: str) -> bool:
        """True when `name` exists in the directory (a symlink is not followed)."""
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def is_regular_file(self, name: str) -> bool:
        """True when `name` is a regular file in the directory (a symlink is not followed)."""
        try:
            mode = os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return False
        return stat.S_ISREG(mode)

    def remove(self, name: str) -> None:
        """Unlink `name` from the directory; a missing name is fine."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def read_bytes(self, name: str) -> bytes:
        """The content of the file `name` in the directory (a symlink is not followed: OSError
        ELOOP). Raises FileNotFoundError when it is missing."""
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.fd)
        with os.fdopen(fd, "rb") as file:
            return file.read()

    def write_atomically(self, name: str, write: Callable[[BinaryIO], None]) -> Path:
        """Create `name` atomically (io/atomic.py: `.NAME.tmp`, fsync, rename, fsync the
        directory; temporary file removed on failure): `write(file)` writes the content to a
        binary file object. Returns `path / name` (for messages)."""
        write_atomically_at(self.fd, name, write)
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        """Write `text` to `name` atomically. Returns `path / name`."""
        return self.write_atomically(name, lambda file: file.write(text.encode()))

    def write_json(self, name: str, content: dict) -> Path:
        """Write `content` as indented JSON (values JSON cannot encode as strings) to `name`
        atomically. Returns `path / name`."""
        return self.write_atomically(name, lambda file: file.write(json_bytes(content)))

    def open_file(self, name: str, flags: int, mode: int = 0o644) -> int:
        """`os.open(name, flags, mode)` relative to the directory; the caller closes it."""
        return os.open(name, flags, mode, dir_fd=self.fd)

    def remove_if_unused(self) -> None:
        """Remove the directory again when `open` created it and it is still empty (a job that
        failed before writing anything leaves no trace), as long as the path still names it."""
        if not (self.created and self.is_open) or self.names():
            return
        try:
            self.check_path_unchanged()
            os.rmdir(self.path)
        except (OSError, VBatchUsageError):
            pass     # not empty after all, or moved: leave it

    @property
    def is_open(self) -> bool:
        """True until `close()`."""
        return self.fd >= 0

    def close(self) -> None:
        """Close the descriptor. Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OutputDirectory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
