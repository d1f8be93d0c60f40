"""Normalisations with the residual add fused in front (vLLM's fused_add_rms_norm layout).

Every norm here is called as forward(x) -> norm(x), or forward(x, residual) ->
(norm(x + residual), x + residual): the decoder carries the residual stream separately and
adds each block's output at the next norm.

- RMSNorm:  y = w * x / sqrt(mean(x^2) + eps)           (LLaMA, Qwen, Mistral, Phi-3, MoE)
- RMSNorm(unit_offset=True): y = (1 + w) * x / sqrt(...) (Gemma: the checkpoint stores w - 1)
- LayerNorm: y = w * (x - mean) / sqrt(var + eps) + b    (GPT-2)

Each picks its own kernel: the native CPU kernel (float32/bf16 on CPU, which also updates
`residual` in place) or PyTorch ops (every other device and dtype).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vbatch.engine.kernels.cpu_kernels import cpu_kernels_for


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension (see module docstring)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device,
                 *, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.normalized_shape = (hidden_size,)
        self.kernels = cpu_kernels_for(torch.device(device), dtype)
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.scale: torch.Tensor | None = None   # the effective multiplier, set after loading

    def process_weights_after_loading(self) -> None:
        """Fix the multiplier once the checkpoint is in: w, or 1 + w kept in float32 (HF
        multiplies the float32 normalised value by float32 1 + w and rounds once; rounding
        1 + w to bf16 first would move a third of the outputs by an ulp)."""
        weight = self.weight.data
        self.scale = weight.float() + 1.0 if self.unit_offset else weight

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        scale = self.scale if self.scale is not None else self.weight
        if self.kernels is not None and x.dim() == 2 and scale.dtype == x.dtype:
            out = self.kernels.rms_norm(x, scale, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is not None:
            residual = x + residual
            x = residual
        if self.unit_offset:     # Gemma: normalise and scale in float32, then round once
            out = F.rms_norm(x.float(), self.normalized_shape, scale.float(), self.eps)
            out = out.to(x.dtype)
        else:
            out = F.rms_norm(x, self.normalized_shape, scale, self.eps)
        return out if residual is None else (out, residual)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (weight and bias) with the fused residual calling convention."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__(hidden_size, eps=eps, dtype=dtype, device=device)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return super().forward(x)
        residual = x + residual
        return super().forward(residual), residual
