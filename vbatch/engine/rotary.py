"""Rotary position embeddings (RoPE), the rotate-half ("NeoX") layout used by HF LLaMA.

For position p and frequency f_j (j < d/2): x'_j = x_j cos(p f_j) - x_{j+d/2} sin(p f_j) and
x'_{j+d/2} = x_{j+d/2} cos(p f_j) + x_j sin(p f_j). Frequencies come from transformers' own
rope-scaling functions (linear, llama3, yarn, longrope, ...) so every scaling type a config can
name is computed exactly as Hugging Face does.
"""
from __future__ import annotations

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
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    if rope_type == "dynamic":
        raise ValueError("dynamic NTK rope scaling is not supported")
    return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables up to `max_position`; applies RoPE to q and k in place shape."""

    def __init__(self, config, head_dim: int, max_position: int, device: torch.device):
        super().__init__()
        inv_freq, scaling = inverse_frequencies(config, head_dim)
        positions = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(positions, inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.head_dim = head_dim
        self.register_buffer("cos", (emb.cos() * scaling).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * scaling).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q [T, Hq*d], k [T, Hk*d] -> rotated (same shapes and dtype)."""
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return (_rotate(q, cos, sin, self.head_dim), _rotate(k, cos, sin, self.head_dim))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    shape = x.shape
    x = x.view(shape[0], -1, head_dim)
    half = head_dim // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).view(shape)
