"""Rotary position embeddings (RoPE), the rotate-half ("NeoX") layout used by HF LLaMA.

For position p and frequency f_j (j < d/2): x'_j = x_j cos(p f_j) - x_{j+d/2} sin(p f_j) and
x'_{j+d/2} = x_{j+d/2} cos(p f_j) + x_j sin(p f_j). Frequencies come from transformers' own
rope-scaling functions (linear, llama3, yarn, longrope, ...) so every scaling type a config can
name is computed exactly as Hugging Face does (cos/sin in float32, then cast to the model dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def rope_parameters(config) -> dict:
    """The config's RoPE settings across transformers versions (rope_parameters / rope_scaling)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inverse_frequencies(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2], attention scaling) for the config's rope type."""
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (params["rope_theta"] ** exponent), 1.0
    if rope_type == "dynamic":
        raise ValueError("dynamic NTK rope scaling is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: PLC0415 - start-up: transformers loads when a model is built
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))


class RotaryEmbedding(nn.Module):
    """cos/sin tables up to `max_position`, in the model dtype; rotates q and k heads at once.

    `kernels` (the native CPU kernels, or None) rotates in place in one pass; otherwise PyTorch
    ops compute the same thing (x * cos + rotate_half(x) * sin).
    """

    def __init__(self, config, head_dim: int, max_position: int, dtype: torch.dtype,
                 device: torch.device, kernels=None):
        super().__init__()
        inv_freq, scaling = inverse_frequencies(config, head_dim)
        positions = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(positions, inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.head_dim = head_dim
        self.kernels = kernels
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
    """A RotaryEmbedding at one step's positions (cos/sin [T, 1, head_dim] on the PyTorch
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
        half = head_dim // 2
        rotated = torch.cat((-heads[..., half:], heads[..., :half]), dim=-1)
        heads.copy_(heads * self.cos + rotated * self.sin)
