"""Qwen2 / Qwen2.5: LLaMA with biases on q, k and v (none on o_proj), an LM head that may be
larger than the tokenizer (padded vocabulary: the extra rows are ordinary logits, as in HF),
and optional sliding-window layers (`use_sliding_window`, from `max_window_layers` on:
transformers spells them out as the config's `layer_types`)."""
from __future__ import annotations

from vbatch.engine.layers.self_attention import AttentionOptions
from vbatch.engine.models.base import sliding_window_of
from vbatch.engine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 (see module docstring)."""

    def attention_options(self, layer_index: int) -> AttentionOptions:
        return AttentionOptions(qkv_bias=True, o_bias=False,
                                sliding_window=sliding_window_of(self.config, layer_index))
