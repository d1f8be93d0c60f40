"""Finding the input files: INPUT (a file, a directory or a glob) -> a sorted list of files.

Supported: Parquet, JSON lines, CSV, and Arrow files (including `datasets.save_to_disk`
directories), `hf://NAME[:SPLIT]` datasets (`hf_inputs.py`), and objects in an object store
(`s3://`, `gs://`, `az://`...: `object_store_inputs.py`, the same rules on the store's listing,
files as `RemoteFile`s). `file://PATH` is the local PATH. Row keys are relative to
`input_root(INPUT)`.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vbatch.errors import InputError
from vbatch.io.formats import SUPPORTED_SUFFIXES
from vbatch.io.hf_inputs import hf_dataset_files, is_hf_uri
from vbatch.io.input_file import InputFile
from vbatch.io.object_store_inputs import remote_input_files, remote_input_root
from vbatch.storage.filesystem import is_object_store_uri, uri_scheme

_GLOB_CHARS = frozenset("*?[")
HF_METADATA_FILES = ("dataset_dict.json", "dataset_info.json", "state.json")


def _is_hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _is_supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_SUFFIXES


def is_glob(text: str) -> bool:
    """True when `text` (an INPUT or one path component) holds a glob wildcard: `*`, `?`, `[`."""
    return any(char in _GLOB_CHARS for char in text)


def glob_base(path: Path) -> Path:
    """The directory a glob `path` searches from: its leading components up to the first one
    holding a wildcard (`data/*/x.parquet` -> `data`), or `.` when the first one has one."""
    fixed = list(_leading_fixed_parts(path))
    return Path(*fixed) if fixed else Path(".")


def _hf_dataset_files(directory: Path) -> list[Path]:
    try:
        state = json.loads((directory / "state.json").read_text())
        return [directory / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(directory.glob("*.arrow"))


def _files_in_directory(directory: Path) -> list[Path]:
    found: list[Path] = []
    for dir_path, dir_names, file_names in os.walk(directory):
        here = Path(dir_path)
        if (here / "state.json").is_file() and (here / "dataset_info.json").is_file():
            found += _hf_dataset_files(here)  # a `datasets.save_to_disk` directory
            dir_names.clear()
            continue
        # Skip hidden/underscore dirs and vbatch's own outputs (`<input>.vbatch/`).
        dir_names[:] = [d for d in dir_names if not _is_hidden(d) and not d.endswith(".vbatch")]
        found += [
            here / name
            for name in file_names
            if not _is_hidden(name) and name not in HF_METADATA_FILES and _is_supported(Path(name))
        ]
    return found


def _local_text(input: str) -> str:
    """INPUT with a `file://` scheme removed (`file:///data/x` -> `/data/x`)."""
    return input[len("file://"):] if uri_scheme(input) == "file" else input


def resolve_input_files(input: str,
                        storage_options: dict[str, Any] | None = None) -> list[InputFile]:
    """Expand INPUT (a file, a directory or a glob) into a sorted list of input files.

    Directories are searched recursively for supported files, skipping names that start with
    "." or "_" (`_SUCCESS`, `.cache/`) and `*.vbatch` output directories; a `datasets` directory
    saved with `save_to_disk` yields its Arrow files. Raises InputError for a missing path, a
    glob matching nothing, an unsupported file type or a directory without supported files.
    `hf://NAME[:SPLIT]` yields the Arrow files of that Hugging Face dataset, in order. An
    object-store URI yields `RemoteFile`s (read with `storage_options`, the parsed
    `--storage-options`); `file://PATH` is PATH.
    """
    kinds = "/".join(SUPPORTED_SUFFIXES)
    if is_hf_uri(input):
        return hf_dataset_files(input)
    if is_object_store_uri(input):
        return remote_input_files(input, storage_options)
    input = _local_text(input)
    if "://" in input:
        raise InputError(f"{input}: unsupported URL scheme; pass a local path, file://, or an "
                         "s3://, gs:// or az:// URI")
    path = Path(input).expanduser()
    if is_glob(input):
        matches = sorted(Path(match) for match in glob.glob(str(path), recursive=True))
        if not matches:
            raise InputError(f"{input}: no files match this pattern")
        files: list[Path] = []
        for match in matches:
            if match.is_dir():
                files += _files_in_directory(match)
            elif _is_supported(match):
                files.append(match)
        if not files:
            raise InputError(f"{input}: the pattern matches no {kinds} files")
    elif path.is_dir():
        files = _files_in_directory(path)
        if not files:
            raise InputError(f"{input}: the directory holds no {kinds} files")
    elif path.is_file():
        if not _is_supported(path):
            suffix = path.suffix or "(none)"
            raise InputError(f"{input}: unsupported file type {suffix!r}; use {kinds}")
        files = [path]
    else:
        raise InputError(f"{input}: no such file or directory")
    return sorted(set(files), key=lambda file: file.as_posix())


def input_root(input: str, storage_options: dict[str, Any] | None = None) -> Path | str | None:
    """The directory that row keys are relative to: a file's parent, the directory itself, or
    the part of a glob before its first wildcard (for an object-store INPUT the same, as a
    prefix URI); None for `hf://` inputs (keys are then relative to the dataset's cache folder,
    `read_batches`' default). Pass it to `read_batches(root=...)`."""
    if is_hf_uri(input):
        return None
    if is_object_store_uri(input):
        return remote_input_root(input, storage_options)
    input = _local_text(input)
    path = Path(input).expanduser()
    if is_glob(input):
        return glob_base(path)
    return path if path.is_dir() else path.parent


def _leading_fixed_parts(path: Path) -> Iterator[str]:
    for part in path.parts[:-1]:
        if is_glob(part):
            return
        yield part
