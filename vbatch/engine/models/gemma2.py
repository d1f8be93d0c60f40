"""Gemma 2 on the layer surface: what differs from LLaMA (llama.py), as HF modeling_gemma2.py.

- Every RMSNorm is Gemma's y = (1 + w) * x / rms(x), computed in float32 and rounded once.
- The embedding is scaled: E[ids] * sqrt(hidden_size), the factor rounded to the model dtype
  first (HF's `Gemma2TextScaledWordEmbedding`: sqrt(3072) = 55.43 becomes 55.5 in bf16).
- Four norms per layer, a "sandwich" around each block:
  h = x + post_attention_layernorm(attn(input_layernorm(x)));
  x' = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))).
  On the fused-residual convention (layers/norm.py) input_layernorm and
  pre_feedforward_layernorm take the residual add; the post-norms norm the block output alone.
- The MLP is gated GELU with the tanh approximation (`hidden_activation`).
- Attention: softmax scale `query_pre_attn_scalar ** -0.5` (not head_dim's), attention-logit
  soft-capping c * tanh(s / c) (`attn_logit_softcapping`), a sliding window on the layers that
  `layer_types` marks sliding_attention, q/k/v/o biases iff `attention_bias`.
- Final-logit soft-capping: logits = c * tanh(logits / c) (`final_logit_softcapping`), on the
  full logits row (ParallelLMHead gathers the vocabulary shards first).
- The head is tied to the embedding unless the config says `tie_word_embeddings=False`.
Gemma 3 (gemma3.py) subclasses this.
"""
from __future__ import annotations

import torch
from torch import nn

from vbatch.engine.layers.activation import gated_activation
from vbatch.engine.layers.forward_context import ForwardContext
from vbatch.engine.layers.mlp import GatedMLP
from vbatch.engine.layers.norm import RMSNorm
from vbatch.engine.layers.rotary import RotaryEmbedding
from vbatch.engine.layers.self_attention import AttentionOptions, SelfAttention
from vbatch.engine.models.base import DecoderForCausalLM, head_dim_of, sliding_window_of
from vbatch.parallel.state import ParallelState


def _softcap_refusal(config, name: str) -> list[str]:
    value = getattr(config, name, None)
    if value is not None and not value > 0:
        return [f"{name}={value!r}: a soft-cap must be a positive number or None"]
    return []


class Gemma2DecoderLayer(nn.Module):
    """input_layernorm -> self_attn -> post_attention_layernorm, then pre_feedforward_layernorm
    -> mlp -> post_feedforward_layernorm, each block's output added to the residual stream
    (carried separately: forward(x, residual, ctx) -> (block output, residual))."""

    def __init__(self, config, ps: ParallelState, dtype: torch.dtype, rotary: RotaryEmbedding,
                 options: AttentionOptions):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps

        def norm() -> RMSNorm:
            return RMSNorm(hidden, eps, dtype, ps.device, unit_offset=True)

        self.input_layernorm = norm()
        self.self_attn = SelfAttention(hidden, config.num_attention_heads,
                                       config.num_key_value_heads, head_dim_of(config), rotary,
                                       ps, dtype, options)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = GatedMLP(hidden, config.intermediate_size, config.hidden_activation, ps,
                            dtype)
        self.post_feedforward_layernorm = norm()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext):
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, ctx))
        h, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class Gemma2ForCausalLM(DecoderForCausalLM):
    """Gemma 2 (see module docstring)."""

    def __init__(self, config, ps: ParallelState, dtype: torch.dtype, max_position: int):
        super().__init__(config, ps, dtype, max_position)
        # HF: a float32 0-d tensor sqrt(hidden), cast to the weight dtype at every forward.
        scale = torch.tensor(config.hidden_size ** 0.5).to(dtype=dtype, device=ps.device)
        self.register_buffer("embed_scale", scale, persistent=False)
        self.final_logit_softcap = getattr(config, "final_logit_softcapping", None)

    @classmethod
    def refusals(cls, config, max_model_len: int) -> list[str]:
        """Config fields whose math this class does not implement."""
        refused = []
        try:
            gated_activation(config.hidden_activation, torch.float32, torch.device("cpu"))
        except ValueError as error:
            refused.append(f"hidden_activation: {error}")
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            refused += _softcap_refusal(config, name)
        return refused

    def attention_options(self, layer_index: int) -> AttentionOptions:
        """Layer `layer_index`'s attention: Gemma 2's scale, soft-cap and window."""
        bias = bool(getattr(self.config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias,
                                scale=self.config.query_pre_attn_scalar ** -0.5,
                                sliding_window=sliding_window_of(self.config, layer_index),
                                logit_softcap=getattr(self.config, "attn_logit_softcapping",
                                                      None))

    def rotary_of(self, layer_index: int) -> RotaryEmbedding:
        """The rotary embedding layer `layer_index` uses (one for all layers in Gemma 2)."""
        return self.rotary_emb

    def make_rotary(self, ps: ParallelState, dtype: torch.dtype, max_position: int):
        return RotaryEmbedding(self.config, head_dim_of(self.config), max_position, dtype,
                               ps.device)

    def make_layer(self, layer_index: int, ps: ParallelState, dtype: torch.dtype) -> nn.Module:
        return Gemma2DecoderLayer(self.config, ps, dtype, self.rotary_of(layer_index),
                                  self.attention_options(layer_index))

    def make_norm(self, ps: ParallelState, dtype: torch.dtype) -> nn.Module:
        return RMSNorm(self.config.hidden_size, self.config.rms_norm_eps, dtype, ps.device,
                       unit_offset=True)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return super().embed(input_ids, positions) * self.embed_scale

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)       # the full vocabulary on every TP rank
        cap = self.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
