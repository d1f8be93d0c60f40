"""Convert a llama, qwen2 or qwen3 GGUF file, once, into a cached Hugging Face-style directory.

The output directory holds `config.json` (a `LlamaConfig`, `Qwen2Config` or `Qwen3Config`, built
by `gguf_configs`), `model.safetensors` (every tensor dequantized to float32 under the Hugging
Face names; for llama the q/k rows are un-permuted from GGUF's interleaved RoPE layout, qwen2 and
qwen3 store them in Hugging Face's layout already), the tokenizer files (with the chat template),
`generation_config.json`, and `vbatch_source.json` (where it came from and the sha256 of the
GGUF's bytes). The tensors must be exactly the Hugging Face model's parameters (names and shapes),
else the conversion is refused.

It is written into a temporary directory next to its final place and renamed into place, so a
reader never sees half a conversion; when two processes race, the first rename wins and the
loser uses the winner's directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from vbatch.engine.loader.gguf_configs import (
    GGUF_ARCHITECTURES,
    build_config,
    gguf_field,
    supported_architectures,
)
from vbatch.errors import VBatchUsageError, one_line

# Bump when the conversion output changes, so old caches are not reused.
CONVERTER_VERSION = 1
SOURCE_INFO_FILE = "vbatch_source.json"
_STALE_TEMP_S = 24 * 3600

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
# The same llama.cpp names in every supported architecture; which of them a file must hold is
# checked against the Hugging Face model (`_check_tensors`).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",  # qwen3
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# Tensors that only feed the config (llama3 RoPE frequency factors), not a parameter.
_CONFIG_ONLY_TENSORS = {"rope_freqs.weight"}


def gguf_cache_dir(gguf_path: Path, cache_root: Path) -> Path:
    """Return the cache directory for `gguf_path`; it changes whenever the file changes.

    The key hashes the absolute path, size, mtime_ns and `CONVERTER_VERSION`; nothing is read
    from the file, so this is a single `stat`.
    """
    path = Path(gguf_path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|v{CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_root) / "gguf" / f"{path.stem}-{digest}"


def convert_gguf(gguf_path: Path, cache_root: Path) -> Path:
    """Return a Hugging Face-style directory holding the converted `gguf_path`.

    The first call converts (seconds); later calls for the unchanged file only check that the
    cache directory exists. Raises `VBatchUsageError` for a file that is missing, is not a
    readable GGUF, is not of a supported architecture (`general.architecture` llama, qwen2 or
    qwen3), or holds what the Hugging Face model cannot (see `gguf_configs.build_config`).
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise VBatchUsageError(f"GGUF file '{gguf_path}' does not exist")
    final_dir = gguf_cache_dir(gguf_path, cache_root)
    if (final_dir / SOURCE_INFO_FILE).is_file():
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(final_dir)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=final_dir.parent))
    try:
        tmp_dir.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        _convert_into(gguf_path.resolve(), tmp_dir)
        try:
            os.rename(tmp_dir, final_dir)
        except OSError as exc:
            if not (final_dir / SOURCE_INFO_FILE).is_file():
                raise VBatchUsageError(
                    f"cannot publish the GGUF conversion to '{final_dir}' ({one_line(exc)}); "
                    "delete it and retry"
                ) from exc
            # Another process finished first: use its directory.
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final_dir


def _remove_stale_temp_dirs(final_dir: Path) -> None:
    """Delete temp dirs of `final_dir` left by killed conversions (untouched for a day)."""
    cutoff = time.time() - _STALE_TEMP_S
    for stale in final_dir.parent.glob(f".tmp-{final_dir.name}-*"):
        try:
            if stale.stat().st_mtime < cutoff:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:  # another process removed it meanwhile
            pass


def read_source_info(converted_dir: Path) -> dict[str, Any]:
    """Return the `vbatch_source.json` record of a converted directory (path, sha256, ...)."""
    return json.loads((Path(converted_dir) / SOURCE_INFO_FILE).read_text())


def hf_tensor_name(gguf_name: str) -> str:
    """Map a GGUF tensor name (`blk.3.attn_q.weight`) to its Hugging Face name.

    Raises `VBatchUsageError` for a tensor this converter does not know.
    """
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if len(parts) == 1 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    raise VBatchUsageError(f"GGUF tensor '{gguf_name}' is not part of a "
                           f"{supported_architectures()} model")


def unpermute_rope(weight: Any, num_heads: int) -> Any:
    """Undo GGUF's RoPE row permutation of a q/k projection (weight or bias) for `num_heads`.

    GGUF stores each head's rows as interleaved pairs; Hugging Face keeps the two rotary halves
    apart: rows (h, i, 2) -> (h, 2, i). Same as transformers' `_reverse_permute_weights`.
    """
    head_half = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, head_half, 2, *weight.shape[1:])
    return w.swapaxes(2, 1).reshape(weight.shape)


def _convert_into(gguf_path: Path, out_dir: Path) -> None:
    """Write the whole converted model for `gguf_path` into the empty directory `out_dir`."""
    import gguf  # noqa: PLC0415 - start-up: gguf/numpy load only when a GGUF is converted

    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as exc:  # the reader raises assorted errors for non-GGUF bytes
        raise VBatchUsageError(f"cannot read '{gguf_path}' as GGUF: {one_line(exc)}") from exc
    arch = gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise VBatchUsageError(
            f"GGUF architecture '{arch}' of '{gguf_path.name}' is not supported; supported: "
            f"{supported_architectures()}"
        )
    config = build_config(reader, arch)
    config.save_pretrained(out_dir)
    _write_weights(reader, config, GGUF_ARCHITECTURES[arch].permuted_qk,
                   out_dir / "model.safetensors")
    _write_generation_config(config, out_dir)
    _write_tokenizer(gguf_path, out_dir)
    info = {
        "source": str(gguf_path),
        "size": gguf_path.stat().st_size,
        "mtime_ns": gguf_path.stat().st_mtime_ns,
        "sha256": _file_sha256(gguf_path),
        "converter_version": CONVERTER_VERSION,
    }
    (out_dir / SOURCE_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _write_weights(reader: Any, config: Any, permuted_qk: bool, path: Path) -> None:
    """Stream every parameter tensor, dequantized to float32, into one safetensors file.

    Written by hand (header, then each tensor's bytes) so only one tensor is in memory at a time.
    With `permuted_qk` the q/k rows are un-permuted (llama). The tensors are checked against
    `config`'s model first.
    """
    import numpy as np  # noqa: PLC0415 - start-up: gguf/numpy load only when a GGUF is converted
    from gguf.quants import dequantize  # noqa: PLC0415 - start-up: gguf/numpy load only when a GGUF is converted

    entries = []
    offset = 0
    for tensor in reader.tensors:
        if tensor.name in _CONFIG_ONLY_TENSORS:
            continue
        shape = [int(n) for n in reversed(tensor.shape)]
        num_bytes = 4 * math.prod(shape)
        entries.append((hf_tensor_name(tensor.name), shape, offset, num_bytes, tensor))
        offset += num_bytes
    _check_tensors(config, {name: shape for name, shape, *_ in entries})
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for name, shape, start, num_bytes, _ in entries:
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [start, start + num_bytes]}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for _name, shape, _, num_bytes, tensor in entries:
            try:
                weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype="<f4")
            except NotImplementedError as exc:
                raise VBatchUsageError(
                    f"GGUF tensor {tensor.name} uses type {tensor.tensor_type.name}, "
                    "which gguf cannot dequantize"
                ) from exc
            if permuted_qk and ".attn_q." in tensor.name:
                weight = unpermute_rope(weight, config.num_attention_heads)
            elif permuted_qk and ".attn_k." in tensor.name:
                weight = unpermute_rope(weight, config.num_key_value_heads)
            weight = np.ascontiguousarray(weight.reshape(shape))
            if weight.nbytes != num_bytes:
                raise RuntimeError(f"GGUF tensor {tensor.name} dequantized to {weight.nbytes} "
                                   f"bytes, expected {num_bytes}")
            f.write(memoryview(weight).cast("B"))


def _check_tensors(config: Any, shapes: dict[str, list[int]]) -> None:
    """Refuse tensors that are not exactly the parameters of `config`'s model (names, shapes).

    The model is built on the meta device (no memory). Without this, Hugging Face would fill a
    missing tensor (say a Qwen2 q_proj bias) with random values and drop an unexpected one.
    """
    import torch  # noqa: PLC0415 - start-up: torch/transformers load only when a GGUF is converted
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 - start-up: transformers loads only when a GGUF is converted

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    problems = [f"missing {n}" for n in sorted(expected.keys() - shapes.keys())]
    problems += [f"unexpected {n}" for n in sorted(shapes.keys() - expected.keys())]
    problems += [f"{n} has shape {shapes[n]}, expected {expected[n]}"
                 for n in sorted(expected.keys() & shapes.keys()) if shapes[n] != expected[n]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise VBatchUsageError(
            f"GGUF tensors do not match a {config.architectures[0]} with the file's metadata: "
            f"{'; '.join(problems[:3])}{more}"
        )


def _write_generation_config(config: Any, out_dir: Path) -> None:
    """Write `generation_config.json` carrying the GGUF's bos/eos/pad token ids."""
    from transformers import GenerationConfig  # noqa: PLC0415 - start-up: transformers loads only when a GGUF is converted

    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(out_dir)


def _write_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """Save the GGUF's tokenizer (and chat template) as Hugging Face tokenizer files."""
    from transformers import AutoTokenizer  # noqa: PLC0415 - start-up: transformers loads only when a GGUF is converted

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise VBatchUsageError(f"cannot build the tokenizer of '{gguf_path.name}': "
                               f"{one_line(exc)}") from exc
    tokenizer.save_pretrained(out_dir)


def _file_sha256(path: Path) -> str:
    """Return the hex sha256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
