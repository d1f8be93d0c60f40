"""Qwen3: LLaMA with a per-head RMSNorm on q and on k (`q_norm`, `k_norm`, over head_dim,
before rotary), an explicit head_dim, biases only where `attention_bias` says, and optional
sliding-window layers (the config's `layer_types`)."""
from __future__ import annotations

from vbatch.engine.layers.self_attention import AttentionOptions
from vbatch.engine.models.base import sliding_window_of
from vbatch.engine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 (see module docstring)."""

    def attention_options(self, layer_index: int) -> AttentionOptions:
        bias = bool(getattr(self.config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm_eps=self.config.rms_norm_eps,
                                sliding_window=sliding_window_of(self.config, layer_index))
