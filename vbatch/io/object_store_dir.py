"""`ObjectStoreDirectory`: a job's output "directory" on an object store (s3://, gs://, az://).

The same handle as `OutputDirectory` (io/directory.py), over the objects directly below a
`Location` prefix (vbatch/storage/filesystem.py), so the part writer and the commit code run
unchanged. What differs, and why it is still safe:

- No rename: `write_atomically` encodes the whole content into memory and uploads it with one
  `pipe_file` (one PUT, or for large content a multipart upload, which S3/GCS/Azure make
  visible only once it completes). A reader sees the whole object or none; when `write` or the
  upload fails, no object appears (an existing one keeps its old content).
- No directories: nothing to create, nothing to remove afterwards (`remove_if_unused`), and no
  path to swap (`check_path_unchanged`). `names()` lists the prefix's direct children: objects,
  and "subdirectories" (deeper keys), which `is_regular_file` tells apart, as on a local disk,
  so user data under the prefix is never mistaken for an empty directory.
- Errors: opening (no such bucket, access denied, endpoint unreachable) raises
  VBatchUsageError naming the URI (exit 2, before the model loads); a failure later (a write
  refused mid-job) raises `ObjectStoreError`, an OSError naming the object's URI, on one line.

`path` is an `ObjectStorePath` (the URI; `path / name` and `.name` as a Path's), for messages.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from types import TracebackType
from typing import Any, BinaryIO

from vbatch.errors import VBatchUsageError, one_line
from vbatch.io.atomic import json_bytes
from vbatch.storage.filesystem import Location, open_location


class ObjectStoreError(OSError):
    """A request to the object store failed: `cannot <action> <uri>: <reason>` (one line);
    `reason` alone is kept for callers that say it their own way."""

    def __init__(self, action: str, uri: str, reason: str) -> None:
        super().__init__(f"cannot {action} {uri}: {reason}")
        self.reason = reason


@dataclass(frozen=True, order=True)
class ObjectStorePath:
    """An object-store URI where local code holds a `Path`: `path / name`, `.name`, `str()`."""

    uri: str

    def __truediv__(self, name: str) -> ObjectStorePath:
        return ObjectStorePath(f"{self.uri.rstrip('/')}/{name}")

    @property
    def name(self) -> str:
        """The last segment of the key (`part-00000.parquet`)."""
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        """The name's suffix (`.parquet`)."""
        return PurePosixPath(self.name).suffix

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        raise TypeError(f"{self.uri} is an object-store URI, not a local path")


def _reason(error: BaseException) -> str:
    return one_line(error) or type(error).__name__


@contextmanager
def _store_request(action: str, uri: str, *, passthrough: tuple[type[BaseException], ...] = ()
                   ) -> Iterator[None]:
    """Turn whatever the fsspec backend raises (botocore's connection errors are no OSErrors)
    into one `ObjectStoreError` line: `cannot <action> <uri>: <reason>`."""
    try:
        yield
    except (ObjectStoreError, *passthrough):
        raise
    except Exception as error:
        raise ObjectStoreError(action, uri, _reason(error)) from error


def normalized_uri(uri: str) -> str:
    """`uri` without its trailing slash (`s3://b/out/` -> `s3://b/out`). Raises
    VBatchUsageError for `.` or `..` segments, which object stores would take literally."""
    text = str(uri).rstrip("/")
    scheme, _, key = text.partition("://")
    if any(segment in (".", "..") for segment in key.split("/")):
        raise VBatchUsageError(f"output {uri}: '.' and '..' are not allowed in an object-store "
                               "key (object stores take them literally)")
    return text if key else f"{scheme}://"


class ObjectStoreDirectory:
    """The objects directly below `location` (a prefix): the `OutputDirectory` interface (see
    module docstring). Close it (or use it as a context manager) when done."""

    def __init__(self, location: Location) -> None:
        self.location = location
        self.path = ObjectStorePath(location.uri.rstrip("/"))
        self._is_open = True
        # name -> is a file, from the last listing and this handle's own writes and removals:
        # `is_regular_file` after `names()` costs no request per name.
        self._kinds: dict[str, bool] = {}

    @classmethod
    def open(cls, uri: str, storage_options: dict[str, Any] | None = None
             ) -> ObjectStoreDirectory:
        """The prefix `uri` (`s3://bucket/out/`), checked to be reachable and listable (nothing
        is written). Raises VBatchUsageError (one line, naming the URI) for a missing bucket,
        denied access or an unreachable endpoint."""
        location = open_location(normalized_uri(uri), storage_options)
        directory = cls(location)
        try:
            directory.names()
        except ObjectStoreError as error:
            raise VBatchUsageError(f"cannot open output directory {directory.path}: "
                                   f"{error.reason}") from None
        return directory

    def _key(self, name: str) -> str:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"not a name inside the output directory: {name!r}")
        return f"{self.location.path.rstrip('/')}/{name}"

    def _uri(self, name: str) -> str:
        return str(self.path / name)

    def _bucket_is_missing(self) -> bool:
        bucket = self.location.path.split("/", 1)[0]
        try:
            return not self.location.fs.exists(bucket)
        except Exception:      # noqa: BLE001 - whatever stops the check, the listing error stands
            return False

    def names(self) -> list[str]:
        """The names directly below the prefix, sorted: objects and subdirectories (a prefix
        without objects is empty). Raises ObjectStoreError (no such bucket, access denied)."""
        fs = self.location.fs
        prefix = self.location.path.rstrip("/")
        with _store_request("list", str(self.path), passthrough=(FileNotFoundError,)):
            try:
                entries = fs.ls(prefix, detail=True, refresh=True)
            except FileNotFoundError:
                if self._bucket_is_missing():
                    raise ObjectStoreError("list", str(self.path), "no such bucket "
                                           f"{prefix.split('/', 1)[0]}") from None
                entries = []
        kinds = {}
        for entry in entries:
            name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
            if str(entry["name"]).rstrip("/") != prefix and name:  # not the prefix's marker
                kinds[name] = entry.get("type") == "file"
        self._kinds = kinds
        return sorted(kinds)

    def exists(self, name: str) -> bool:
        """True when an object (or subdirectory) `name` is below the prefix."""
        return self._info(name) is not None

    def is_regular_file(self, name: str) -> bool:
        """True when `name` is an object (not a subdirectory); answered from the last listing
        when it named `name`."""
        if name in self._kinds:
            return self._kinds[name]
        info = self._info(name)
        return info is not None and info.get("type") == "file"

    def _info(self, name: str) -> dict | None:
        key = self._key(name)
        self.location.fs.invalidate_cache(key)
        with _store_request("read", self._uri(name), passthrough=(FileNotFoundError,)):
            try:
                return self.location.fs.info(key)
            except FileNotFoundError:
                return None

    def read_bytes(self, name: str) -> bytes:
        """The content of object `name`. Raises FileNotFoundError when there is none."""
        with _store_request("read", self._uri(name), passthrough=(FileNotFoundError,)):
            return self.location.fs.cat_file(self._key(name))

    def remove(self, name: str) -> None:
        """Delete object `name`; a missing one is fine (never a subdirectory's objects)."""
        self._kinds.pop(name, None)
        with _store_request("delete", self._uri(name), passthrough=(FileNotFoundError,)):
            try:
                self.location.fs.rm_file(self._key(name))
            except FileNotFoundError:
                pass

    def write_atomically(self, name: str, write: Callable[[BinaryIO], None]) -> ObjectStorePath:
        """Create or replace object `name` at once: `write(file)` writes the content to an
        in-memory binary file, then one upload makes it visible whole. When `write` raises,
        nothing is uploaded; when the upload fails, ObjectStoreError (no object appears, an
        existing one is unchanged). Returns `path / name`."""
        buffer = io.BytesIO()
        write(buffer)
        self._upload(name, buffer.getvalue())
        return self.path / name

    def _upload(self, name: str, data: bytes, **conditions: Any) -> None:
        with _store_request("write", self._uri(name), passthrough=(FileExistsError,)):
            self.location.fs.pipe_file(self._key(name), data, **conditions)
        self._kinds[name] = True

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create object `name` only if there is none (a conditional write: S3 `If-None-Match:
        *`, GCS generation 0, Azure `overwrite=False`, where the backend implements fsspec's
        `mode="create"`); False when it exists. A backend that ignores the condition writes
        anyway: callers check for the object first and read it back (io/output_lock.py)."""
        try:
            self._upload(name, data, mode="create")
        except FileExistsError:
            return False
        except ObjectStoreError as error:
            if not isinstance(error.__cause__, TypeError):    # a backend without `mode`
                raise
            self._upload(name, data)
        return True

    def replace_if_unchanged(self, name: str, data: bytes, expected: dict) -> bool:
        """Overwrite object `name` with `data` only while it is still the version `expected`
        (an `info()` result): S3 `If-Match` on its ETag. False when it changed. Elsewhere (no
        portable conditional overwrite) delete it and `create_exclusive`: a race between two
        writers there is caught only by the caller reading the object back."""
        etag = expected.get("ETag")
        protocols = self.location.fs.protocol
        if "s3" not in ((protocols,) if isinstance(protocols, str) else protocols) or not etag:
            self.remove(name)
            return self.create_exclusive(name, data)
        try:
            self._upload(name, data, IfMatch=etag)
        except ObjectStoreError as error:
            if isinstance(error.__cause__, PermissionError):
                raise
            return False          # 412 Precondition Failed: someone else's version now
        return True

    def info(self, name: str) -> dict | None:
        """The store's metadata of object `name` (size, ETag / generation...), or None."""
        return self._info(name)

    def write_text(self, name: str, text: str) -> ObjectStorePath:
        """Write `text` to object `name` at once. Returns `path / name`."""
        return self.write_atomically(name, lambda file: file.write(text.encode()))

    def write_json(self, name: str, content: dict) -> ObjectStorePath:
        """Write `content` as indented JSON (io/atomic.py's `json_bytes`) to object `name` at
        once. Returns `path / name`."""
        return self.write_atomically(name, lambda file: file.write(json_bytes(content)))

    def check_writable(self, probe_name: str) -> None:
        """Write and delete the object `probe_name`; raises VBatchUsageError naming the
        directory when either is refused (access denied, read-only credentials)."""
        try:
            self._upload(probe_name, b"")
            self.remove(probe_name)
        except ObjectStoreError as error:
            raise VBatchUsageError(f"output directory {self.path} is not writable: "
                                   f"{error.reason}") from None

    def check_path_unchanged(self) -> None:
        """Nothing to check: a prefix cannot be swapped for a symlink."""

    def remove_if_unused(self) -> None:
        """Nothing to remove: an object store has no directory to leave behind."""

    @property
    def is_open(self) -> bool:
        """True until `close()`."""
        return self._is_open

    def close(self) -> None:
        """Mark the handle closed (no descriptor to release). Idempotent."""
        self._is_open = False

    def __enter__(self) -> ObjectStoreDirectory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
