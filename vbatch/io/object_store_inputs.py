"""INPUT in an object store (`s3://`, `gs://`, `az://`...): a URI -> its objects, as RemoteFiles.

The rules are those of local inputs (io/inputs.py), applied to the store's listing: an object
is one file; a prefix ("directory") is every supported object under it, skipping keys with a
component that starts with "." or "_" (`_SUCCESS`, `.cache/`), `*.vbatch/` outputs, and giving
a `datasets.save_to_disk` folder's Arrow files in its own order; a glob (`s3://b/in/*.parquet`,
`**` recursive) matches objects and prefixes. The store is listed once per call, with the
filesystem's listing cache cleared first: a job sees the objects as they are now.

Listing errors (no such bucket or key, access denied, no credentials, no connection) are one
line `InputError`s naming the URI, raised before any model loads.
"""
from __future__ import annotations

import json
import posixpath
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from vbatch.errors import InputError, VBatchUsageError, one_line
from vbatch.io.formats import SUPPORTED_SUFFIXES
from vbatch.io.input_file import RemoteFile, remote_uri
from vbatch.storage.filesystem import open_location, uri_scheme

HF_METADATA_FILES = ("dataset_dict.json", "dataset_info.json", "state.json")
_GLOB_CHARS = frozenset("*?[")
_MESSAGE_LIMIT = 200


def _is_glob(text: str) -> bool:
    return any(char in _GLOB_CHARS for char in text)


def _is_hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _is_supported(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in SUPPORTED_SUFFIXES


@contextmanager
def _listing_errors(uri: str) -> Iterator[None]:
    """Any failure of the store while listing `uri` as one line InputError naming it."""
    try:
        yield
    except VBatchUsageError:
        raise
    except FileNotFoundError:
        raise InputError(f"{uri}: no such object, prefix or bucket") from None
    except PermissionError as error:
        raise InputError(f"{uri}: access denied ({one_line(error, _MESSAGE_LIMIT)})") from None
    except Exception as error:  # noqa: BLE001 - SDKs raise their own types (botocore, ...)
        raise InputError(f"{uri}: cannot list the object store "
                         f"({type(error).__name__}: {one_line(error, _MESSAGE_LIMIT)})") from None


def remote_input_files(input: str, storage_options: dict[str, Any] | None) -> list[RemoteFile]:
    """The objects INPUT (an object-store URI: an object, a prefix or a glob) names, sorted by
    URI. Raises InputError for a missing object or prefix, a glob matching nothing, an
    unsupported object, a prefix without supported objects, or a store that cannot be listed;
    VBatchUsageError for a bad scheme or `storage_options`."""
    kinds = "/".join(SUPPORTED_SUFFIXES)
    location = open_location(input, storage_options)
    fs, base = location.fs, location.path
    scheme = uri_scheme(input)

    def remote(path: str, info: dict) -> RemoteFile:
        return RemoteFile(remote_uri(scheme, path), path, fs, location.arrow_fs, dict(info))

    with _listing_errors(input):
        fs.invalidate_cache()
        if _is_glob(base):
            matches = fs.glob(base, detail=True)
            if not matches:
                raise InputError(f"{input}: no objects match this pattern")
            files: list[RemoteFile] = []
            for path, info in sorted(matches.items()):
                if info.get("type") == "directory":
                    files += _files_under(fs, path, remote)
                elif _is_supported(path) and not posixpath.basename(path).startswith("."):
                    files.append(remote(path, info))
            if not files:
                raise InputError(f"{input}: the pattern matches no {kinds} objects")
        else:
            info = fs.info(base)
            if info.get("type") == "directory":
                files = _files_under(fs, base, remote)
                if not files:
                    raise InputError(f"{input}: the prefix holds no {kinds} objects")
            elif not _is_supported(base):
                suffix = posixpath.splitext(base)[1] or "(none)"
                raise InputError(f"{input}: unsupported file type {suffix!r}; use {kinds}")
            else:
                files = [remote(base, info)]
    return sorted(set(files), key=lambda file: file.uri)


def _files_under(fs: Any, base: str, remote: Callable[[str, dict], RemoteFile]
                 ) -> list[RemoteFile]:
    """The supported objects under the prefix `base` (the module docstring's rules)."""
    folders: dict[str, dict[str, tuple[str, dict]]] = defaultdict(dict)
    for path, info in fs.find(base, withdirs=False, detail=True).items():
        folder, name = posixpath.split(posixpath.relpath(path, base))
        folders["" if folder == "." else folder][name] = (path, info)
    datasets = {folder for folder, names in folders.items()
                if "state.json" in names and "dataset_info.json" in names}
    found: list[RemoteFile] = []
    for folder, names in folders.items():
        parts = folder.split("/") if folder else []
        if any(_is_hidden(part) or part.endswith(".vbatch") for part in parts):
            continue
        ancestors = ["/".join(parts[:depth]) for depth in range(len(parts) + 1)]
        if any(ancestor in datasets for ancestor in ancestors[:-1]):
            continue  # inside a `save_to_disk` folder: that folder lists its own files
        if folder in datasets:
            found += _dataset_files(fs, names, remote)
            continue
        found += [remote(path, info) for name, (path, info) in names.items()
                  if not _is_hidden(name) and name not in HF_METADATA_FILES
                  and _is_supported(name)]
    return found


def _dataset_files(fs: Any, names: dict[str, tuple[str, dict]],
                   remote: Callable[[str, dict], RemoteFile]) -> list[RemoteFile]:
    """The Arrow files of a `datasets.save_to_disk` folder, in its `state.json` order (all its
    `.arrow` objects, sorted, when state.json cannot be read)."""
    state_path = names["state.json"][0]
    folder = posixpath.dirname(state_path)
    try:
        with fs.open(state_path, "rb") as handle:
            entries = json.loads(handle.read())["_data_files"]
        listed = [entry["filename"] for entry in entries]
    except (OSError, ValueError, KeyError, TypeError):
        listed = sorted(name for name in names if name.endswith(".arrow"))
    return [remote(names[name][0] if name in names else posixpath.join(folder, name),
                   names[name][1] if name in names else {}) for name in listed]


def remote_input_root(input: str, storage_options: dict[str, Any] | None) -> str:
    """The prefix URI that row keys of INPUT's objects are relative to: an object's folder,
    the prefix itself, or a glob's leading components without wildcards."""
    location = open_location(input, storage_options)
    scheme, path = uri_scheme(input), location.path
    if _is_glob(path):
        fixed: list[str] = []
        for part in path.split("/")[:-1]:
            if _is_glob(part):
                break
            fixed.append(part)
        return remote_uri(scheme, "/".join(fixed))
    with _listing_errors(input):
        is_folder = location.fs.isdir(path)
    return remote_uri(scheme, path if is_folder else posixpath.dirname(path))
