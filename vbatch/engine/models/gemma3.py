"""Gemma 3, text only (model_type gemma3_text: HF Gemma3ForCausalLM / Gemma3TextConfig), as HF
modeling_gemma3.py: Gemma 2 (gemma2.py: (1 + w) RMSNorms, sqrt(hidden)-scaled embedding,
sandwich norms, gated GELU-tanh, `query_pre_attn_scalar` scale, tied head) plus

- q_norm / k_norm: a (1 + w) RMSNorm over each head of q and of k, before rotary;
- local/global layers (`layer_types`): sliding_attention layers use the window and their own
  RoPE parameters (`rope_parameters["sliding_attention"]`, base 10 000), full_attention ones
  theirs (base 1 000 000, possibly scaled, e.g. linear factor 8): one RotaryEmbedding per
  layer type present on the stage, each layer using its type's;
- final-logit soft-capping only where `final_logit_softcapping` is set (None by default).

HF's Gemma3 attention never applies `attn_logit_softcapping` (the config keeps the field, the
attention call does not pass it), so a config that sets it is refused rather than guessed at.
The multimodal `gemma3` config (Gemma3ForConditionalGeneration) is not registered.
"""
from __future__ import annotations

import torch
from torch import nn

from vbatch.engine.layers.rotary import RotaryEmbedding
from vbatch.engine.layers.self_attention import AttentionOptions
from vbatch.engine.models.base import head_dim_of, layer_type_of, sliding_window_of
from vbatch.engine.models.gemma2 import Gemma2ForCausalLM
from vbatch.parallel.state import ParallelState


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text decoder (see module docstring)."""

    @classmethod
    def refusals(cls, config, max_model_len: int) -> list[str]:
        refused = super().refusals(config, max_model_len)
        cap = getattr(config, "attn_logit_softcapping", None)
        if cap is not None:
            refused.append(f"attn_logit_softcapping={cap!r}: Hugging Face's Gemma3 attention "
                           "ignores this field, so whether to apply it is ambiguous; "
                           "vbatch implements it for Gemma 2 only")
        return refused

    def attention_options(self, layer_index: int) -> AttentionOptions:
        """Layer `layer_index`'s attention: q/k norms, Gemma's scale, the layer's window."""
        config = self.config
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm_eps=config.rms_norm_eps,
                                qk_norm_unit_offset=True,
                                scale=config.query_pre_attn_scalar ** -0.5,
                                sliding_window=sliding_window_of(config, layer_index))

    def make_rotary(self, ps: ParallelState, dtype: torch.dtype, max_position: int):
        config = self.config
        # Only the types of this pipeline stage's layers: each table is [max_position, head_dim].
        types = sorted({layer_type_of(config, i) for i in range(self.start_layer,
                                                                  self.end_layer)})
        return nn.ModuleDict({
            layer_type: RotaryEmbedding(config, head_dim_of(config), max_position, dtype,
                                        ps.device, layer_type=layer_type)
            for layer_type in types})

    def rotary_of(self, layer_index: int) -> RotaryEmbedding:
        return self.rotary_emb[layer_type_of(self.config, layer_index)]
