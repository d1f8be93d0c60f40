"""Rotary position embeddings (RoPE), the rotate-half ("NeoX") layout of HF LLaMA, Qwen,
Mistral, Gemma and Phi-3.

For position p and frequency f_j (j < r/2, r the rotary dimension, r <= head_dim):
x'_j = x_j cos(p f_j) - x_{j+r/2} sin(p f_j) and x'_{j+r/2} = x_{j+r/2} cos(p f_j) +
x_j sin(p f_j); dimensions r..head_dim-1 pass unchanged (partial rotary, Phi-3's
`partial_rotary_factor`). Frequencies of scaled types (linear, llama3, yarn, longrope, ...)
come from transformers' own rope functions, so every type a config can name is computed exactly
as Hugging Face does (cos/sin in float32, times the type's attention scaling, then cast to the
model dtype). `dynamic` NTK scaling changes the frequencies only for sequences longer than
max_position_embeddings, which max_model_len never exceeds: within it, its frequencies are
the unscaled ones HF computes at start-up. A config may give per-layer-type parameters
(Gemma 3: `rope_parameters` {"sliding_attention": ..., "full_attention": ...}): one embedding
per `layer_type`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vbatch.engine.kernels.cpu_kernels import cpu_kernels_for

_LAYER_TYPES = ("full_attention", "sliding_attention")


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """The config's RoPE settings (of `layer_type`'s layers, where the config gives them per
    layer type) across transformers versions (rope_parameters / rope_scaling)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if any(key in params for key in _LAYER_TYPES):
        if layer_type not in params:
            raise ValueError(f"config gives RoPE parameters per layer type ({', '.join(params)}) "
                             f"but none for {layer_type!r}")
        params = dict(params[layer_type])
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rotary_dim_of(config, head_dim: int, layer_type: str | None = None) -> int:
    """Dimensions of each head that rotate: head_dim * partial_rotary_factor."""
    factor = rope_parameters(config, layer_type).get(
        "partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    return int(head_dim * factor)


def inverse_frequencies(config, head_dim: int, layer_type: str | None = None
                        ) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim/2], attention scaling) for the config's rope type."""
    params = rope_parameters(config, layer_type)
    rope_type = params["rope_type"]
    if rope_type == "default":
        dim = rotary_dim_of(config, head_dim, layer_type)
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (params["rope_theta"] ** exponent), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: PLC0415 - start-up: transformers loads when a model is built
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not implemented")
    per_layer = layer_type is not None and layer_type in (
        getattr(config, "rope_parameters", None) or {})
    return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"),
                                          layer_type=layer_type if per_layer else None)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_position, rotary_dim] in the model dtype; rotates q and k heads at
    once. The native CPU kernel rotates in place in one pass when the whole head rotates; other
    cases (partial rotary, GPUs) use PyTorch ops that compute the same thing."""

    def __init__(self, config, head_dim: int, max_position: int, dtype: torch.dtype,
                 device: torch.device, *, layer_type: str | None = None):
        super().__init__()
        inv_freq, scaling = inverse_frequencies(config, head_dim, layer_type)
        positions = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(positions, inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.head_dim = head_dim
        self.rotary_dim = emb.shape[1]
        if self.rotary_dim > head_dim or self.rotary_dim % 2:
            raise ValueError(f"rotary dimension {self.rotary_dim} does not fit head_dim "
                             f"{head_dim}")
        kernels = cpu_kernels_for(torch.device(device), dtype)
        self.kernels = kernels if self.rotary_dim == head_dim else None
        self.register_buffer("cos", (emb.cos() * scaling).to(device=device, dtype=dtype),
                             persistent=False)
        self.register_buffer("sin", (emb.sin() * scaling).to(device=device, dtype=dtype),
                             persistent=False)

    def at(self, positions: torch.Tensor) -> RotaryStep:
        """The embedding at one step's [T] positions, for every layer of that step: the
        PyTorch path looks cos/sin up here, once; the kernel reads the tables itself."""
        if self.kernels is not None:
            return RotaryStep(self, positions, None, None)
        return RotaryStep(self, positions, self.cos[positions].unsqueeze(1),
                          self.sin[positions].unsqueeze(1))


@dataclass
class RotaryStep:
    """A RotaryEmbedding at one step's positions (cos/sin [T, 1, rotary_dim] on the PyTorch
    path, None when the native kernel runs)."""

    embedding: RotaryEmbedding
    positions: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None

    def rotate_(self, x: torch.Tensor, num_heads: int) -> None:
        """Rotate the first `num_heads` heads of every row of x [T, >= num_heads * head_dim]
        in place, row t at position positions[t]."""
        embedding, head_dim = self.embedding, self.embedding.head_dim
        if self.cos is None:
            embedding.kernels.rotary_(x, num_heads, head_dim, self.positions, embedding.cos,
                                      embedding.sin)
            return
        heads = x[:, : num_heads * head_dim].view(x.shape[0], num_heads, head_dim)
        heads = heads[..., : embedding.rotary_dim]
        half = embedding.rotary_dim // 2
        rotated = torch.cat((-heads[..., half:], heads[..., :half]), dim=-1)
        heads.copy_(heads * self.cos + rotated * self.sin)
