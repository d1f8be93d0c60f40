"""Per-architecture GGUF metadata -> transformers config, for the architectures vbatch converts.

`GGUF_ARCHITECTURES` is the one table of what differs between the supported architectures
(llama, qwen2, qwen3); `build_config` reads the `{arch}.*` metadata they all share (llama.cpp
writes the same keys for each) into the architecture's transformers config class.

Written here rather than taken from transformers' GGUF loader (`load_gguf_checkpoint`): that one
drops `qwen3.attention.key_length` (so a Qwen3 whose head_dim is not hidden/heads gets the wrong
one) and knows no rope scaling or sliding window for these architectures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vbatch.errors import VBatchUsageError


@dataclass(frozen=True)
class GGUFArchitecture:
    """What differs between two supported GGUF architectures.

    `config_class` / `model_class`: the transformers config class and its `architectures` entry.
    `permuted_qk`: llama.cpp's convert_hf_to_gguf permuted the q/k rows (weights and biases)
    into interleaved RoPE pairs, so the converter undoes it. Only `LlamaModel` does that: the
    llama graph uses "normal" (interleaved) rope, while qwen2/qwen3 use NEOX rope, which is
    Hugging Face's rotate-half layout, so their rows are stored as they are (transformers' GGUF
    loader, too, un-permutes for llama only). `tensor_flags`: config flags that are True exactly
    when the named tensor is in the file. `fixed`: config values that hold for every such file.
    """

    config_class: str
    model_class: str
    permuted_qk: bool
    tensor_flags: tuple[tuple[str, str], ...] = ()
    fixed: tuple[tuple[str, Any], ...] = ()


GGUF_ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture(
        "LlamaConfig", "LlamaForCausalLM", permuted_qk=True,
        tensor_flags=(("attention_bias", "blk.0.attn_q.bias"), ("mlp_bias", "blk.0.ffn_up.bias")),
    ),
    # Qwen2 always has q/k/v biases (no flag to set); the file must hold them.
    "qwen2": GGUFArchitecture(
        "Qwen2Config", "Qwen2ForCausalLM", permuted_qk=False,
        fixed=(("use_sliding_window", False),),
    ),
    # Qwen3: q_norm/k_norm per head (attn_q_norm/attn_k_norm), biases only if the file has them.
    "qwen3": GGUFArchitecture(
        "Qwen3Config", "Qwen3ForCausalLM", permuted_qk=False,
        tensor_flags=(("attention_bias", "blk.0.attn_q.bias"),),
        fixed=(("use_sliding_window", False),),
    ),
}


def supported_architectures() -> str:
    """The supported `general.architecture` values as text for messages ("llama, qwen2, qwen3")."""
    return ", ".join(GGUF_ARCHITECTURES)


def build_config(reader: Any, arch: str) -> Any:
    """Build the transformers config of a GGUF file of architecture `arch` (a table key).

    Reads the `{arch}.*` model metadata, the tensor names (biases, tied output) and the
    tokenizer's special token ids. Raises `VBatchUsageError` for missing model metadata and for
    what the Hugging Face class cannot express: partial rotary embeddings, key and value head
    sizes that differ, sliding-window attention, unknown rope scaling.
    """
    import transformers  # noqa: PLC0415 - start-up: transformers loads only when a GGUF is converted

    spec = GGUF_ARCHITECTURES[arch]

    def get(key: str, default: Any = None) -> Any:
        return gguf_field(reader, f"{arch}.{key}", default)

    def require(key: str) -> int:
        value = get(key)
        if value is None:
            raise VBatchUsageError(f"GGUF metadata lacks '{arch}.{key}'; the file is incomplete")
        return int(value)

    _refuse_sliding_window(reader, arch)
    names = {t.name for t in reader.tensors}
    num_heads = require("attention.head_count")
    hidden_size = require("embedding_length")
    head_dim = int(get("attention.key_length", hidden_size // num_heads))
    value_dim = int(get("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise VBatchUsageError(f"GGUF with key head size {head_dim} and value head size "
                               f"{value_dim} is not supported (they must be equal)")
    rotary_dim = int(get("rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise VBatchUsageError(f"GGUF with partial rotary embeddings ({rotary_dim} of {head_dim}) "
                               "is not supported")
    vocab_size = get("vocab_size")
    if vocab_size is None:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embd is None:
            raise VBatchUsageError("GGUF file has no token_embd.weight tensor")
        vocab_size = int(embd.shape[-1])
    rope_theta = float(get("rope.freq_base", 10000.0))
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    rope_parameters.update(_rope_scaling(reader, get, rope_theta, head_dim))
    kwargs = dict(
        architectures=[spec.model_class],
        vocab_size=int(vocab_size),
        hidden_size=hidden_size,
        intermediate_size=require("feed_forward_length"),
        num_hidden_layers=require("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=_short_float32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_parameters=rope_parameters,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=gguf_field(reader, "tokenizer.ggml.padding_token_id"),
        dtype="float32",
    )
    kwargs.update(spec.fixed)
    kwargs.update({flag: tensor in names for flag, tensor in spec.tensor_flags})
    return getattr(transformers, spec.config_class)(**kwargs)


def _refuse_sliding_window(reader: Any, arch: str) -> None:
    """Refuse sliding-window metadata: which layers it applies to is not in a GGUF file.

    (Hugging Face's Qwen2/Qwen3 slide only from `max_window_layers` on, a value GGUF lacks.)
    """
    keys = sorted(k for k in reader.fields if k.startswith(f"{arch}.attention.sliding_window")
                  or k.startswith(f"{arch}.attention.key_length_swa"))
    if keys:
        shown = ", ".join(f"{k} = {gguf_field(reader, k)}" for k in keys)
        raise VBatchUsageError(
            f"GGUF sets {shown}: sliding-window attention is not supported for GGUF files; "
            "use the model's Hugging Face checkpoint (config.json + safetensors) instead"
        )


def _rope_scaling(reader: Any, get: Any, rope_theta: float, head_dim: int) -> dict[str, Any]:
    """Return the rope scaling entries (`rope_type`, `factor`, ...) the GGUF asks for, if any."""
    kind = get("rope.scaling.type")
    factor = get("rope.scaling.factor", get("rope.scale_linear"))
    original = get("rope.scaling.original_context_length")
    if kind in (None, "none") and factor is not None and float(factor) != 1.0:
        kind = "linear"
    if kind in ("linear", "yarn") and factor is None:
        raise VBatchUsageError(f"GGUF rope scaling '{kind}' has no rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": float(factor)}
        if original is not None:
            out["original_max_position_embeddings"] = int(original)
        return out
    if kind not in (None, "none"):
        raise VBatchUsageError(f"GGUF rope scaling type '{kind}' is not supported")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    return {} if freqs is None else _llama3_rope(freqs, rope_theta, head_dim)


def _llama3_rope(freqs_tensor: Any, rope_theta: float, head_dim: int) -> dict[str, Any]:
    """Recover llama3 rope parameters from llama.cpp's `rope_freqs` factors (default knobs).

    llama.cpp stores factor f_i = 1 / ((1 - s_i) / factor + s_i) per frequency, with
    s_i = clip((8192 / wavelen_i - low) / (high - low), 0, 1), low = 1, high = 4.
    """
    import numpy as np  # noqa: PLC0415 - start-up: gguf/numpy load only when a GGUF is converted
    from gguf.quants import dequantize  # noqa: PLC0415 - start-up: gguf/numpy load only when a GGUF is converted

    stored = np.asarray(dequantize(freqs_tensor.data, freqs_tensor.tensor_type), np.float64).ravel()
    factor, original = float(stored.max()), 8192
    wavelen = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = np.clip((original / wavelen - 1.0) / 3.0, 0.0, 1.0)
    expected = 1.0 / ((1 - smooth) / factor + smooth)
    if expected.shape != stored.shape or not np.allclose(stored, expected, rtol=1e-4):
        raise VBatchUsageError("GGUF rope_freqs factors do not match llama3 rope scaling; "
                               "not supported")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": original}


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    """Return the value of GGUF metadata `key` (scalar, string or list), or `default`."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _short_float32(value: float) -> float:
    """Return the shortest decimal that rounds to the same float32 (9.99999974e-06 -> 1e-05)."""
    import numpy as np  # noqa: PLC0415 - start-up: gguf/numpy load only when a GGUF is converted

    return float(str(np.float32(value)))
