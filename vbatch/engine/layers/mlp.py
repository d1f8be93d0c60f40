"""The gated MLP: down_proj(act(gate_proj(x)) * up_proj(x)), Megatron-split.

gate and up are one column-parallel matmul (`gate_up_proj`, this rank's slice of each), the
gated activation is elementwise on the shard, and down_proj is row-parallel (one all-reduce).
"""
from __future__ import annotations

import torch
from torch import nn

from vbatch.engine.layers.activation import gated_activation
from vbatch.parallel.linear import MergedColumnParallelLinear, RowParallelLinear
from vbatch.parallel.state import ParallelState


class GatedMLP(nn.Module):
    """x [T, hidden] -> [T, hidden]; `activation` is an HF hidden_act name."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str,
                 ps: ParallelState, dtype: torch.dtype, *, bias: bool = False,
                 reduce_results: bool = True):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias=bias, tp_group=ps.tp,
            dtype=dtype, device=ps.device)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias,
                                           tp_group=ps.tp, dtype=dtype, device=ps.device,
                                           reduce_results=reduce_results)
        self.act = gated_activation(activation, dtype, ps.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))
