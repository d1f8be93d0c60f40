"""Fetch a directory (or one object) from object storage, once per node, into a local cache.

`fetch_directory(location, cache_root)` lists the remote prefix (every object: name, size and
ETag / generation / mtime), derives a content address from that listing and the URI (sha256),
and returns `cache_root/remote/<address>/`, a complete local copy of every object under the
prefix (relative paths kept). `fetch_file` does the same for a single object and returns the
local file inside its own entry. A changed remote object (new ETag, size or mtime) gives a new
address, hence a new entry; an unchanged listing reuses the entry without downloading.

Safety, for the driver and several replicas (or TP ranks) on one node racing for the same
entry: a complete entry is one whose completion marker (`.vbatch-fetched.json`) exists, and an
entry only ever appears by an atomic rename of a fully downloaded, size-checked temporary
directory (`cache_root/remote/.tmp-<address>-*`) into place. Downloads are serialized per
address by a file lock (`cache_root/remote/.lock-<address>`, released by the OS when its holder
dies); whoever gets the lock first downloads, the others find the entry complete after waiting.
A killed download leaves only a temporary directory, which the next lock holder deletes.

Each real download prints one line to stderr (`vbatch: fetched s3://... (N files, X MB) into
... in Ys`); a cached entry prints nothing. Everything the user can fix (missing bucket, no
objects, access denied, a failed transfer) raises `VBatchUsageError` with one line naming the URI.
This module knows filesystems only: what a model directory must hold is the caller's `check`.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from vbatch.errors import VBatchUsageError, one_line
from vbatch.storage.filesystem import Location

logger = logging.getLogger(__name__)

#: Bump when the cache layout or the address derivation changes, so old entries are not reused.
CACHE_LAYOUT_VERSION = 1
COMPLETE_MARKER = ".vbatch-fetched.json"
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "generation", "content_md5")
_MTIME_KEYS = ("LastModified", "last_modified", "updated", "mtime", "modified", "created")


@dataclass(frozen=True, slots=True)
class RemoteObject:
    """One object of a listing: `name` relative to the listed prefix ('/'-separated), `path`
    within the filesystem, `size` in bytes and `version` (ETag, generation or mtime text)."""

    name: str
    path: str
    size: int
    version: str


def list_objects(location: Location) -> list[RemoteObject]:
    """Every object under `location` (recursively), sorted by name, freshly listed (no
    filesystem listing cache). Raises VBatchUsageError (one line, naming the URI) for a
    missing bucket, denied access or any other listing failure."""
    fs, root = location.fs, location.path.rstrip("/")
    try:
        fs.invalidate_cache(root)
        entries = fs.find(root, detail=True)
    except PermissionError as error:
        raise _access_denied(location, error) from None
    except FileNotFoundError as error:
        raise VBatchUsageError(f"cannot list {location.uri}: {one_line(error, 200)}") from None
    except Exception as error:  # the SDKs' own errors (botocore, aiohttp, google, azure)
        if _looks_denied(error):
            raise _access_denied(location, error) from None
        raise VBatchUsageError(f"cannot list {location.uri}: {type(error).__name__}: "
                               f"{one_line(error, 200)}") from None
    objects = []
    for path, info in entries.items():
        path = path.rstrip("/") if isinstance(path, str) else path
        if info.get("type", "file") != "file" or str(info.get("name", path)).endswith("/"):
            continue
        if path == root:
            raise VBatchUsageError(f"{location.uri} is a single object, not a prefix of objects")
        name = path[len(root) + 1:]
        _check_relative_name(location, name)
        objects.append(RemoteObject(name, path, int(info.get("size") or 0), _version_of(info)))
    return sorted(objects, key=lambda obj: obj.name)


def stat_object(location: Location) -> RemoteObject:
    """The single object `location` names (its `name` is the last path component).
    Raises VBatchUsageError (one line) when it does not exist or cannot be read."""
    fs, path = location.fs, location.path.rstrip("/")
    try:
        fs.invalidate_cache(path)
        info = fs.info(path)
    except PermissionError as error:
        raise _access_denied(location, error) from None
    except FileNotFoundError:
        raise VBatchUsageError(f"{location.uri} does not exist (no such object, or no such "
                               "bucket)") from None
    except Exception as error:  # the SDKs' own errors
        if _looks_denied(error):
            raise _access_denied(location, error) from None
        raise VBatchUsageError(f"cannot read {location.uri}: {type(error).__name__}: "
                               f"{one_line(error, 200)}") from None
    if info.get("type", "file") != "file":
        raise VBatchUsageError(f"{location.uri} is a prefix of objects, not a single object")
    name = path.rsplit("/", 1)[-1]
    return RemoteObject(name, path, int(info.get("size") or 0), _version_of(info))


def content_address(location: Location, objects: list[RemoteObject]) -> str:
    """sha256 hex of the normalized URI and the listing (names, sizes, versions): the name of
    the cache entry. It changes whenever any object is added, removed or rewritten."""
    listing = {
        "layout": CACHE_LAYOUT_VERSION,
        "uri": location.fs.unstrip_protocol(location.path.rstrip("/")),
        "objects": [[obj.name, obj.size, obj.version] for obj in objects],
    }
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def fetch_directory(location: Location, cache_root: Path | str, *,
                    check: Callable[[list[str]], None] | None = None) -> Path:
    """The local copy of every object under `location`: `cache_root/remote/<address>/`, whose
    name is the content address (`content_address`). Downloads only when no complete entry
    exists (see module docstring). `check(names)`, given the relative names before any byte is
    downloaded, may raise VBatchUsageError to refuse the listing. Raises VBatchUsageError
    (one line) for no objects under the prefix and for any listing or transfer failure."""
    objects = list_objects(location)
    if not objects:
        raise VBatchUsageError(f"no objects under {location.uri}")
    if check is not None:
        check([obj.name for obj in objects])
    return _fetch(location, objects, Path(cache_root), relist=lambda: list_objects(location))


def fetch_file(location: Location, cache_root: Path | str) -> Path:
    """The local copy of the single object `location`: `cache_root/remote/<address>/<name>`
    (the parent's name is the content address). Same guarantees and errors as
    `fetch_directory`."""
    obj = stat_object(location)
    entry = _fetch(location, [obj], Path(cache_root), relist=lambda: [stat_object(location)])
    return entry / obj.name


def _fetch(location: Location, objects: list[RemoteObject], cache_root: Path,
           relist: Callable[[], list[RemoteObject]]) -> Path:
    """The complete entry of `objects`: found, or downloaded under the address's lock."""
    address = content_address(location, objects)
    remote_root = cache_root / "remote"
    entry = remote_root / address
    if (entry / COMPLETE_MARKER).is_file():
        logger.debug("using cached %s (%s)", location.uri, entry)
        return entry
    try:
        remote_root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(remote_root / f".lock-{address}"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("waiting for another process fetching %s", location.uri)
            lock.acquire()
    except OSError as error:
        raise VBatchUsageError(f"cannot use the model cache {remote_root} for {location.uri}: "
                               f"{one_line(error, 200)}") from None
    try:
        if (entry / COMPLETE_MARKER).is_file():   # another process fetched it meanwhile
            return entry
        _remove_leftovers(remote_root, address)
        _download_entry(location, objects, remote_root, entry, relist)
        return entry
    finally:
        lock.release()


def _remove_leftovers(remote_root: Path, address: str) -> None:
    """Under the lock nobody else writes this address: any temporary directory of it is a
    killed download's, and an entry without its marker is not ours to trust."""
    for stale in remote_root.glob(f".tmp-{address}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    entry = remote_root / address
    if entry.exists():
        shutil.rmtree(entry, ignore_errors=True)


def _download_entry(location: Location, objects: list[RemoteObject], remote_root: Path,
                    entry: Path, relist: Callable[[], list[RemoteObject]]) -> None:
    """Download `objects` into a temporary directory, verify it, then rename it to `entry`."""
    started = time.perf_counter()
    total = sum(obj.size for obj in objects)
    logger.info("fetching %s (%d files, %.1f MB) into %s", location.uri, len(objects),
                total / 1e6, entry)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=remote_root))
    try:
        tmp_dir.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        local_paths = [tmp_dir / obj.name for obj in objects]
        for local in local_paths:
            local.parent.mkdir(parents=True, exist_ok=True)
        try:
            location.fs.get([obj.path for obj in objects], [str(p) for p in local_paths])
        except PermissionError as error:
            raise _access_denied(location, error) from None
        except Exception as error:  # network, SDK errors, disk full
            if _looks_denied(error):
                raise _access_denied(location, error) from None
            raise VBatchUsageError(
                f"downloading {location.uri} failed ({type(error).__name__}: "
                f"{one_line(error, 200)}); nothing was cached, run again to retry") from None
        _verify(location, objects, local_paths, relist)
        _write_marker(tmp_dir, location, objects)
        os.rename(tmp_dir, entry)
        _fsync_dir(remote_root)
    except OSError as error:
        raise VBatchUsageError(f"cannot store {location.uri} in the model cache "
                               f"{remote_root}: {one_line(error, 200)}") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    print(f"vbatch: fetched {location.uri} ({len(objects)} files, {total / 1e6:.1f} MB) "
          f"into the cache {entry} in {elapsed:.1f}s", file=sys.stderr, flush=True)


def _verify(location: Location, objects: list[RemoteObject], local_paths: list[Path],
            relist: Callable[[], list[RemoteObject]]) -> None:
    """Every file has its listed size, is flushed to disk, and the remote did not change
    while it was downloading (a second listing equals the first)."""
    for obj, local in zip(objects, local_paths):
        size = local.stat().st_size if local.is_file() else -1
        if size != obj.size:
            raise VBatchUsageError(f"downloading {location.uri} gave {obj.name} with {size} "
                                   f"bytes, listed as {obj.size}; nothing was cached, run "
                                   "again to retry")
        with open(local, "rb") as handle:
            os.fsync(handle.fileno())
    if relist() != objects:
        raise VBatchUsageError(f"{location.uri} changed while it was downloading; nothing was "
                               "cached, run again")


def _write_marker(tmp_dir: Path, location: Location, objects: list[RemoteObject]) -> None:
    record = {"uri": location.uri, "layout": CACHE_LAYOUT_VERSION,
              "fetched_at": dt.datetime.now(dt.timezone.utc).isoformat(),
              "objects": [[obj.name, obj.size, obj.version] for obj in objects]}
    marker = tmp_dir / COMPLETE_MARKER
    with open(marker, "w") as handle:
        json.dump(record, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(tmp_dir)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:   # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _version_of(info: dict) -> str:
    """An object's version text: its ETag / generation / checksum, else its mtime (UTC)."""
    for key in _VERSION_KEYS:
        if info.get(key):
            return f"{key}={info[key]}"
    for key in _MTIME_KEYS:
        value = info.get(key)
        if isinstance(value, dt.datetime):
            return f"mtime={value.timestamp():.6f}"   # timezone-free, same on every node
        if value:
            return f"mtime={value}"
    return ""


def _check_relative_name(location: Location, name: str) -> None:
    """Refuse a key that would not stay inside the cache entry as a local file."""
    parts = name.split("/")
    if not name or any(part in ("", ".", "..") for part in parts) or "\\" in name:
        raise VBatchUsageError(f"{location.uri} holds an object named {name!r}, which cannot "
                               "be a local file name")


def _looks_denied(error: BaseException) -> bool:
    text = str(error)
    return any(word in text for word in ("AccessDenied", "Forbidden", "403",
                                         "AuthorizationPermissionMismatch"))


def _access_denied(location: Location, error: BaseException) -> VBatchUsageError:
    return VBatchUsageError(
        f"access denied to {location.uri} ({one_line(error, 160)}); check the credentials "
        "(AWS_* / GOOGLE_APPLICATION_CREDENTIALS / AZURE_STORAGE_* variables, profile) or "
        "--storage-options")
