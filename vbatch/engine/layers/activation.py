"""Gated activations of the MLP: x = [gate | up] (last dimension) -> act(gate) * up.

SiluAndMul (LLaMA, Qwen, Mistral, Phi-3, MoE experts) runs the native CPU kernel where one
exists; GeluTanhAndMul (Gemma: GELU with the tanh approximation) uses PyTorch ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vbatch.engine.kernels.cpu_kernels import cpu_kernels_for


class SiluAndMul(nn.Module):
    """[T, 2w] -> silu(x[:, :w]) * x[:, w:]."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.kernels = cpu_kernels_for(torch.device(device), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and x.dim() == 2:
            return self.kernels.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """[T, 2w] -> gelu_tanh(x[:, :w]) * x[:, w:]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


_GATED = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
          "gelu_tanh": "gelu_tanh"}


def gated_activation(name: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The gated activation module for an HF `hidden_act` name (ValueError if not implemented;
    exact GELU, for one, is refused rather than approximated)."""
    kind = _GATED.get(name)
    if kind is None:
        raise ValueError(f"hidden activation {name!r} is not implemented (supported: "
                         f"{', '.join(sorted(_GATED))})")
    return SiluAndMul(dtype, device) if kind == "silu" else GeluTanhAndMul()
