"""An input file: a local `Path`, or a `RemoteFile` (one object in an object store).

Local files stay `pathlib.Path`s, read exactly as before (memory maps included). An object in
S3 / GCS / Azure is a `RemoteFile`: its URI (what messages, row keys and the job fingerprint
name) and the filesystem it is read through (`storage/filesystem.py`). The readers never ask
which one they hold: they call `open_input` (a binary file object), `arrow_input` (what
pyarrow's readers take), `file_size`, `row_key_prefix` and `default_root` here.

A `RemoteFile` has the few `Path` attributes the readers look at (`name`, `suffix`,
`as_posix()`; `str()` is its URI). Equality and hashing use the URI only, so files key dicts
and sort the same way wherever they come from; the filesystem objects pickle (a Ray read task
gets them).
"""
from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import pyarrow as pa


@dataclass(frozen=True)
class RemoteFile:
    """One object in an object store: `uri` (`s3://bucket/key`), `path` within `fs` (fsspec)
    and `arrow_fs` (pyarrow) (`bucket/key`), and its `info` (size, ETag, ... as the store's
    listing gave them; not compared)."""

    uri: str
    path: str
    fs: Any = field(repr=False, compare=False)
    arrow_fs: Any = field(repr=False, compare=False)
    info: dict = field(default_factory=dict, repr=False, compare=False)

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        """The last component of the key (`x.parquet`)."""
        return PurePosixPath(self.path).name

    @property
    def suffix(self) -> str:
        """The name's suffix (`.parquet`), as `Path.suffix`."""
        return PurePosixPath(self.path).suffix

    def as_posix(self) -> str:
        """The URI (what files sort by)."""
        return self.uri


#: What the readers take: a local path or an object-store object.
InputFile = Path | RemoteFile


def remote_uri(scheme: str, path: str) -> str:
    """The URI of `path` (within a store's filesystem) under `scheme`: `s3` + `b/k` -> `s3://b/k`."""
    return f"{scheme}://{path}"


def uri_path(uri: str) -> str:
    """The path within the store of a URI built by `remote_uri`: `s3://b/k/` -> `b/k`."""
    return uri.partition("://")[2].rstrip("/")


def open_input(file: InputFile) -> IO[bytes]:
    """`file` opened for binary reading (a context manager, iterable by lines)."""
    if isinstance(file, RemoteFile):
        return file.fs.open(file.path, "rb")
    return open(file, "rb")


@contextmanager
def arrow_input(file: InputFile, *, seekable: bool = True) -> Iterator[str | pa.NativeFile]:
    """What pyarrow's readers take for `file`, closed on exit: the local path as text (so
    pyarrow opens and maps it itself, as it always did), or the object opened through its
    pyarrow filesystem (random access, or a stream with `seekable=False`)."""
    if not isinstance(file, RemoteFile):
        yield str(file)
        return
    opener = file.arrow_fs.open_input_file if seekable else file.arrow_fs.open_input_stream
    with opener(file.path) as source:
        yield source


def file_size(file: InputFile) -> int:
    """Size of `file` in bytes (an object's size from its listing when known)."""
    if isinstance(file, RemoteFile):
        size = file.info.get("size")
        return int(size) if size is not None else int(file.fs.size(file.path))
    return os.stat(file).st_size


def default_root(files: list[InputFile]) -> str:
    """The deepest directory (or prefix URI) holding all `files`: the row-key root when the
    caller names none."""
    if files and isinstance(files[0], RemoteFile):
        scheme = files[0].uri.partition("://")[0]
        common = posixpath.commonpath([posixpath.dirname(file.path) for file in files])
        return remote_uri(scheme, common)
    return os.path.commonpath([os.path.abspath(Path(file).parent) for file in files])


def row_key_prefix(file: InputFile, root: str | os.PathLike[str]) -> str:
    """`file`'s part of its row keys: its path relative to `root` (a directory, or for an
    object a prefix URI), with `/` separators."""
    if isinstance(file, RemoteFile):
        return posixpath.relpath(file.path, uri_path(str(root)))
    return Path(os.path.relpath(os.path.abspath(file), os.path.abspath(root))).as_posix()
