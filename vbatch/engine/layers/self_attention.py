"""The decoder's self-attention block on the parallel layers, with its per-layer options.

out = o_proj(attention(rope(norm_q(q)), rope(norm_k(k)), v)), [q | k | v] = qkv_proj(x), with
this rank's heads (QKV column-parallel, GQA-aware; o_proj row-parallel, one all-reduce).
Options a model file sets from its config: q/k/v and o biases, per-head RMSNorm of q and k
before rotary (Qwen3, Gemma 3), the softmax scale (default head_dim^-1/2; Gemma 2's
query_pre_attn_scalar), a sliding window and attention-logit softcapping (PagedAttention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vbatch.engine.layers.attention import PagedAttention
from vbatch.engine.layers.forward_context import ForwardContext
from vbatch.engine.layers.norm import RMSNorm
from vbatch.engine.layers.rotary import RotaryEmbedding
from vbatch.parallel.linear import QKVParallelLinear, RowParallelLinear
from vbatch.parallel.state import ParallelState


@dataclass(frozen=True)
class AttentionOptions:
    """What one layer's attention computes beyond LLaMA's (see module docstring)."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm_eps: float | None = None          # per-head RMSNorm on q and k when set
    qk_norm_unit_offset: bool = False         # Gemma's (1 + w) RMSNorm
    scale: float | None = None                # None: head_dim ** -0.5
    sliding_window: int | None = None
    logit_softcap: float | None = None


class SelfAttention(nn.Module):
    """Paged causal self-attention of one decoder layer (one rank's heads)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rotary: RotaryEmbedding, ps: ParallelState, dtype: torch.dtype,
                 options: AttentionOptions = AttentionOptions()):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(hidden_size, head_dim, num_heads, num_kv_heads,
                                          bias=options.qkv_bias, tp_group=ps.tp, dtype=dtype,
                                          device=ps.device)
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, bias=options.o_bias,
                                        tp_group=ps.tp, dtype=dtype, device=ps.device)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.rotary = rotary
        self.q_norm = self.k_norm = None
        if options.qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, options.qk_norm_eps, dtype, ps.device,
                                  unit_offset=options.qk_norm_unit_offset)
            self.k_norm = RMSNorm(head_dim, options.qk_norm_eps, dtype, ps.device,
                                  unit_offset=options.qk_norm_unit_offset)
        extra = {name: value for name, value in (("sliding_window", options.sliding_window),
                                                 ("logit_softcap", options.logit_softcap))
                 if value is not None}
        scale = options.scale if options.scale is not None else head_dim ** -0.5
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, head_dim, scale=scale,
                                   **extra)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        qk_size = self.q_size + self.kv_size
        if self.q_norm is not None:
            num_tokens, d = qkv.shape[0], self.head_dim
            q, k = qkv[:, : self.q_size], qkv[:, self.q_size:qk_size]
            q.copy_(self.q_norm(q.reshape(-1, d)).view(num_tokens, -1))
            k.copy_(self.k_norm(k.reshape(-1, d)).view(num_tokens, -1))
        # q and k heads rotated together, in place; q, k, v stay views of qkv.
        ctx.rope(self.rotary).rotate_(qkv, self.num_heads + self.num_kv_heads)
        q, k, v = qkv[:, : self.q_size], qkv[:, self.q_size:qk_size], qkv[:, qk_size:]
        return self.o_proj(self.attn(q, k, v, ctx.meta))
