"""LLaMA-family decoder (Llama 2/3, SmolLM2, Mistral) on the layer surface.

x = embed(ids); per layer: h = x + o_proj(attn(rope(qkv(rms(x))))), x = h + down(silu(gate) *
up)(rms(h)); logits = lm_head(rms(x)). GQA, RoPE with any HF rope scaling, tied or untied head,
optional biases (`attention_bias`, `mlp_bias`); Mistral adds a sliding window on every layer.
Qwen2 and Qwen3 subclass it (qwen2.py, qwen3.py) through `attention_options`.
"""
from __future__ import annotations

import torch
from torch import nn

from vbatch.engine.layers.forward_context import ForwardContext
from vbatch.engine.layers.mlp import GatedMLP
from vbatch.engine.layers.norm import RMSNorm
from vbatch.engine.layers.rotary import RotaryEmbedding
from vbatch.engine.layers.self_attention import AttentionOptions, SelfAttention
from vbatch.engine.models.base import DecoderForCausalLM, head_dim_of, sliding_window_of
from vbatch.parallel.state import ParallelState


class LlamaDecoderLayer(nn.Module):
    """input_layernorm -> self_attn -> post_attention_layernorm -> mlp, with the residual
    stream carried separately: forward(x, residual, ctx) -> (mlp output, residual). `mlp`
    replaces the gated MLP (a sparse MoE block: Mixtral, Qwen3-MoE)."""

    def __init__(self, config, ps: ParallelState, dtype: torch.dtype, rotary: RotaryEmbedding,
                 options: AttentionOptions, *, mlp_bias: bool = False,
                 mlp: nn.Module | None = None):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps, dtype, ps.device)
        self.self_attn = SelfAttention(hidden, config.num_attention_heads,
                                       config.num_key_value_heads, head_dim_of(config), rotary,
                                       ps, dtype, options)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype, ps.device)
        self.mlp = mlp if mlp is not None else GatedMLP(
            hidden, config.intermediate_size, getattr(config, "hidden_act", "silu"), ps, dtype,
            bias=mlp_bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext):
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, ctx)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(DecoderForCausalLM):
    """LLaMA / Mistral (see module docstring)."""

    def attention_options(self, layer_index: int) -> AttentionOptions:
        """The attention of layer `layer_index` as this config defines it."""
        bias = bool(getattr(self.config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias,
                                sliding_window=sliding_window_of(self.config, layer_index))

    def make_rotary(self, ps: ParallelState, dtype: torch.dtype, max_position: int):
        return RotaryEmbedding(self.config, head_dim_of(self.config), max_position, dtype,
                               ps.device)

    def make_layer(self, layer_index: int, ps: ParallelState, dtype: torch.dtype) -> nn.Module:
        return LlamaDecoderLayer(self.config, ps, dtype, self.rotary_emb,
                                 self.attention_options(layer_index),
                                 mlp_bias=bool(getattr(self.config, "mlp_bias", False)))

    def make_norm(self, ps: ParallelState, dtype: torch.dtype) -> nn.Module:
        return RMSNorm(self.config.hidden_size, self.config.rms_norm_eps, dtype, ps.device)
