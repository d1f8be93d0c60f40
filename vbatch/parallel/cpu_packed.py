"""Linear weights pre-packed into oneDNN's blocked layout, for bfloat16 matmuls on CPU.

`F.linear` on a CPU bf16 tensor runs oneDNN, which first reorders the [out, in] weight into its
blocked layout on every call. Packing once at load time skips that: the same kernel, so results
are bit-identical to `F.linear` (tests/test_cpu_packed.py), about 7% less time for a whole
SmolLM2 job on the 2-core dev box (benchmarks/RESULTS.md). The packed copy replaces the
original weight (memory stays 1x), except where another module shares the weight (a tied LM
head keeps the embedding's).

Uses `torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise` (the ops PyTorch's own
Inductor emits for frozen CPU linears). They are private: when a PyTorch build lacks them,
`can_pack` is False and layers keep `F.linear`.
"""
from __future__ import annotations

import os

import torch


def can_pack(weight: torch.Tensor) -> bool:
    """Whether `weight` ([out, in]) can and should be packed: a CPU bf16 matrix, oneDNN
    present, and packing not disabled with VBATCH_PACK_WEIGHTS=0 (declared and checked in
    vbatch/env.py, which parallel/ may not import; the words here are its FALSE_WORDS)."""
    if os.environ.get("VBATCH_PACK_WEIGHTS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedWeight:
    """y = x W^T (+ b) with W held in oneDNN's layout; `linear(x, bias)` == F.linear(x, W, b)."""

    def __init__(self, weight: torch.Tensor):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, bias, "none",
                                                  [], "")
