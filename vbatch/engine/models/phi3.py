"""Phi-3 / Phi-3.5-mini / Phi-4-mini (model_type phi3): LLaMA's math with these differences.

- The checkpoint fuses the projections: `self_attn.qkv_proj.weight` [(H + 2 Hkv) d, hidden]
  and `mlp.gate_up_proj.weight` [2 inter, hidden] (gate first, as HF's `chunk(2)`). They are
  split into lazy q/k/v and gate/up views before loading, so each tensor-parallel rank reads
  only its own heads of each part (a contiguous 1/tp slice of a fused tensor would be wrong).
- Partial rotary (`partial_rotary_factor`, Phi-4-mini 0.75): the first rotary_dim of each head
  rotate, the rest pass through (layers/rotary.py).
- `longrope` scaling (Phi-3-*-128k, Phi-3.5, Phi-4-mini): the short factors and the longrope
  attention factor. Hugging Face switches every position of a sequence to the long factors
  once it is longer than original_max_position_embeddings; the registry refuses a
  max_model_len past that length, so only the short factors are ever needed.
- `sliding_window` (Phi-3-mini-4k: 2047) applies to every layer when set, as in HF.
- No biases anywhere (HF builds every Linear with bias=False whatever the config says); the
  head is tied when `tie_word_embeddings` (Phi-4-mini). Dropouts are training-only.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from vbatch.engine.layers.self_attention import AttentionOptions
from vbatch.engine.models.base import head_dim_of, sliding_window_of
from vbatch.engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vbatch.engine.models.loading import split_fused
from vbatch.parallel.state import ParallelState


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 (see module docstring)."""

    def attention_options(self, layer_index: int) -> AttentionOptions:
        """No biases (whatever the config says), the window where the config sets one."""
        return AttentionOptions(sliding_window=sliding_window_of(self.config, layer_index))

    def make_layer(self, layer_index: int, ps: ParallelState, dtype: torch.dtype) -> nn.Module:
        return LlamaDecoderLayer(self.config, ps, dtype, self.rotary_emb,
                                 self.attention_options(layer_index), mlp_bias=False)

    def checkpoint_tensors(self, weights: Iterable[tuple[str, object]]
                           ) -> Iterator[tuple[str, object]]:
        """The fused qkv_proj / gate_up_proj tensors as lazy q/k/v and gate/up parts (routed
        into our fused parameters, per part and per rank, by `stacked_params`)."""
        config = self.config
        head_dim = head_dim_of(config)
        q_size = config.num_attention_heads * head_dim
        kv_size = config.num_key_value_heads * head_dim
        qkv = [("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)]
        gate_up = [("gate_proj", config.intermediate_size), ("up_proj", config.intermediate_size)]
        for name, tensor in weights:
            if name.endswith(".self_attn.qkv_proj.weight"):
                yield from split_fused(name, tensor, "qkv_proj", qkv)
            elif name.endswith(".mlp.gate_up_proj.weight"):
                yield from split_fused(name, tensor, "gate_up_proj", gate_up)
            else:
                yield name, tensor
