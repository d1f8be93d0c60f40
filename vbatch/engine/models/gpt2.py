"""GPT-2 on the layer surface.

x = wte(ids) + wpe(positions); per block: x = x + c_proj(attn(c_attn(ln_1(x)))),
x = x + c_proj(act(c_fc(ln_2(x)))); logits = ln_f(x) wte^T (the head is tied to wte).
GPT-2 checkpoints store Conv1D weights as [in, out]: they are read transposed, and the fused
c_attn [q | k | v] is split per head before sharding.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from vbatch.engine.layers.attention import PagedAttention
from vbatch.engine.layers.forward_context import ForwardContext
from vbatch.engine.layers.norm import LayerNorm
from vbatch.engine.models.base import DecoderForCausalLM
from vbatch.parallel.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vbatch.parallel.state import ParallelState

_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                   "mlp.c_proj.weight")


class GPT2Attention(nn.Module):
    def __init__(self, config, ps: ParallelState, dtype: torch.dtype):
        super().__init__()
        hidden, num_heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // num_heads
        self.c_attn = QKVParallelLinear(hidden, head_dim, num_heads, num_heads, bias=True,
                                        tp_group=ps.tp, dtype=dtype, device=ps.device)
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True, tp_group=ps.tp, dtype=dtype,
                                        device=ps.device)
        self.q_size = self.c_attn.q_size
        scale = head_dim ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        self.attn = PagedAttention(self.c_attn.num_heads, self.c_attn.num_heads, head_dim, scale)

    def forward(self, x, ctx: ForwardContext):
        q, k, v = self.c_attn(x).split([self.q_size] * 3, dim=-1)
        return self.c_proj(self.attn(q, k, v, ctx.meta))


class GPT2MLP(nn.Module):
    def __init__(self, config, ps: ParallelState, dtype: torch.dtype):
        super().__init__()
        from transformers.activations import ACT2FN  # noqa: PLC0415 - start-up: transformers loads when a model is built
        inner = config.n_inner or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, inner, bias=True, tp_group=ps.tp,
                                         dtype=dtype, device=ps.device)
        self.c_proj = RowParallelLinear(inner, config.hidden_size, bias=True, tp_group=ps.tp,
                                        dtype=dtype, device=ps.device)
        self.act = ACT2FN[config.activation_function]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    """ln_1 -> attn -> ln_2 -> mlp, residual stream carried separately (see models/base.py)."""

    def __init__(self, config, ps: ParallelState, dtype: torch.dtype):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.hidden_size, eps, dtype, ps.device)
        self.attn = GPT2Attention(config, ps, dtype)
        self.ln_2 = LayerNorm(config.hidden_size, eps, dtype, ps.device)
        self.mlp = GPT2MLP(config, ps, dtype)

    def forward(self, x, residual, ctx: ForwardContext):
        if residual is None:
            residual, h = x, self.ln_1(x)
        else:
            h, residual = self.ln_1(x, residual)
        h, residual = self.ln_2(self.attn(h, ctx), residual)
        return self.mlp(h), residual


class GPT2LMHeadModel(DecoderForCausalLM):
    """Our GPT-2 (learned positions `wpe` on the first stage; the head always tied to wte)."""

    checkpoint_prefix = "transformer."
    embed_name, layers_name, norm_name = "wte", "h", "ln_f"
    first_stage_names = ("wpe",)
    ignored_suffixes = (".attn.bias", ".attn.masked_bias")   # causal-mask buffers
    stacked_params = ()
    always_tied = True

    def __init__(self, config, ps: ParallelState, dtype: torch.dtype, max_position: int):
        super().__init__(config, ps, dtype, max_position)
        if self.is_first_stage:
            self.wpe = nn.Embedding(config.n_positions, config.hidden_size, dtype=dtype,
                                    device=ps.device)
            self.wpe.requires_grad_(False)

    def make_layer(self, layer_index: int, ps: ParallelState, dtype: torch.dtype) -> nn.Module:
        return GPT2Block(self.config, ps, dtype)

    def make_norm(self, ps: ParallelState, dtype: torch.dtype) -> nn.Module:
        return LayerNorm(self.config.hidden_size, self.config.layer_norm_epsilon, dtype,
                         ps.device)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids) + self.wpe(positions)

    def checkpoint_tensors(self, weights: Iterable[tuple[str, object]]
                           ) -> Iterator[tuple[str, object]]:
        """Conv1D weights ([in, out]) seen transposed, still read lazily."""
        for name, tensor in weights:
            yield name, TransposedView(tensor) if name.endswith(_CONV1D_WEIGHTS) else tensor


class TransposedView:
    """A 2-D checkpoint tensor seen transposed, still read lazily one slice at a time."""

    def __init__(self, inner):
        self.inner = inner
        rows, cols = tuple(inner.shape)
        self.shape = (cols, rows)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.inner.narrow(1 - dim, start, length).t()
