"""URIs -> filesystems: where a job's inputs, outputs and model live.

A location is a local path (or `file://` URI) or an object-store URI: `s3://` / `s3a://` (s3fs),
`gs://` / `gcs://` (gcsfs), `az://` / `abfs://` / `abfss://` (adlfs). Object stores go through
fsspec, so credentials and endpoints come the ecosystem's usual way (the AWS SDKs' variables,
`AWS_ENDPOINT_URL` and profiles included, `GOOGLE_APPLICATION_CREDENTIALS`, Azure's
`AZURE_STORAGE_*`), plus `--storage-options`: keyword arguments passed through to the fsspec
filesystem (`{"endpoint_url": ..., "anon": true}` for s3fs, as pandas, datasets and Ray Data
take them). The fsspec packages are optional extras (`pip install 'vbatch[s3]'`); a URI whose
package is missing is refused with that command.

`Location.fs` is the fsspec filesystem, `Location.arrow_fs` the same one as a pyarrow
filesystem (what pyarrow's readers and writers take); `Location.path` is the path within it
(for object stores `bucket/key`, no scheme).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from vbatch.errors import VBatchUsageError

#: Object-store URI schemes -> (fsspec protocol, the package implementing it, vbatch's extra).
OBJECT_STORE_SCHEMES = {
    "s3": ("s3", "s3fs", "s3"), "s3a": ("s3", "s3fs", "s3"),
    "gs": ("gcs", "gcsfs", "gcs"), "gcs": ("gcs", "gcsfs", "gcs"),
    "az": ("abfs", "adlfs", "azure"), "abfs": ("abfs", "adlfs", "azure"),
    "abfss": ("abfs", "adlfs", "azure"),
}


def uri_scheme(text: str) -> str | None:
    """The lower-case scheme of `text` (`s3` for `s3://b/k`), or None for a plain path."""
    head, sep, _ = str(text).partition("://")
    if not sep or not head or not head.replace("+", "").replace("-", "").isalnum():
        return None
    return head.lower()


def is_object_store_uri(text: str | os.PathLike[str]) -> bool:
    """True for an `s3://`, `gs://`, `az://`... URI (see `OBJECT_STORE_SCHEMES`)."""
    return uri_scheme(str(text)) in OBJECT_STORE_SCHEMES


def parse_storage_options(text: str | dict | None) -> dict[str, Any]:
    """`--storage-options` as a dict: JSON or YAML mapping text, a path to a .json / .yaml
    file holding one, or already a mapping (job YAML). None -> {}. Raises VBatchUsageError
    (one line) for anything that is not a mapping."""
    if text is None:
        return {}
    if isinstance(text, dict):
        return dict(text)
    raw = str(text).strip()
    if not raw:
        return {}
    if not raw.startswith("{") and Path(raw).expanduser().is_file():
        raw = Path(raw).expanduser().read_text()
    try:
        value = json.loads(raw)
    except ValueError:
        import yaml  # noqa: PLC0415 (only for YAML-written options)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise VBatchUsageError(f"--storage-options is neither JSON nor YAML ({error})"
                                   .splitlines()[0]) from None
    if not isinstance(value, dict):
        raise VBatchUsageError("--storage-options must be a JSON/YAML mapping of filesystem "
                               f"options (or a file holding one), got {raw[:60]!r}")
    return value


def _fsspec_filesystem(scheme: str, storage_options: dict[str, Any]):
    protocol, package, extra = OBJECT_STORE_SCHEMES[scheme]
    import fsspec  # noqa: PLC0415 (fsspec is only needed for object stores)
    try:
        return fsspec.filesystem(protocol, **storage_options)
    except ImportError:
        raise VBatchUsageError(f"{scheme}:// needs the {package} package: pip install "
                               f"'vbatch[{extra}]'") from None
    except (TypeError, ValueError) as error:
        raise VBatchUsageError(f"bad --storage-options for {scheme}://: {error}") from None


@dataclass(frozen=True)
class Location:
    """A directory or file on some filesystem: `uri` as the user wrote it (for messages),
    `path` within `fs` (fsspec) / `arrow_fs` (pyarrow), `is_local` for the local disk."""

    uri: str
    path: str
    fs: Any = field(repr=False)
    arrow_fs: pafs.FileSystem = field(repr=False)
    is_local: bool = False

    def child(self, name: str) -> Location:
        """The location `name` inside this one."""
        uri = self.uri.rstrip("/") + "/" + name
        path = self.path.rstrip("/") + "/" + name
        return Location(uri, path, self.fs, self.arrow_fs, self.is_local)


def open_location(uri: str | os.PathLike[str],
                  storage_options: dict[str, Any] | None = None) -> Location:
    """The `Location` of `uri`: a local path / `file://` URI (pyarrow's local filesystem,
    `storage_options` unused) or an object-store URI (fsspec with `storage_options`).
    Raises VBatchUsageError for an unknown scheme or a missing fsspec package."""
    text = str(uri)
    scheme = uri_scheme(text)
    if scheme is None or scheme == "file":
        local = text[len("file://"):] if scheme == "file" else text
        path = os.path.abspath(os.path.expanduser(local))
        from fsspec.implementations.local import LocalFileSystem  # noqa: PLC0415
        return Location(text, path, LocalFileSystem(), pafs.LocalFileSystem(), is_local=True)
    if scheme not in OBJECT_STORE_SCHEMES:
        raise VBatchUsageError(f"unsupported URI scheme {scheme}:// in {text}; use a local "
                               f"path or one of {', '.join(sorted(OBJECT_STORE_SCHEMES))}://")
    fs = _fsspec_filesystem(scheme, dict(storage_options or {}))
    path = fs._strip_protocol(text).rstrip("/")
    if not path:
        raise VBatchUsageError(f"{text} names no bucket")
    arrow_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    return Location(text, path, fs, arrow_fs)
