"""Mixtral: Mistral with every layer's MLP replaced by a sparse mixture of experts.

What differs from LLaMA: the feed-forward block is `SparseMoeBlock` (layers/moe.py):
softmax(router logits) in float32 over `num_local_experts`, the top `num_experts_per_tok`
renormalised to sum 1 (kept in float32 until each expert's weighted output is cast back, as
Hugging Face does), each expert a SiLU-gated MLP of `intermediate_size`. Attention has no
biases and, like Mistral, a sliding window on every layer when `sliding_window` is set.

Checkpoints: Hub / `save_pretrained` names `block_sparse_moe.gate` and
`block_sparse_moe.experts.{e}.w1|w3|w2` (gate, up, down), and transformers 5's in-memory
names `mlp.gate`, `mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I].
Qwen3-MoE (qwen3_moe.py) subclasses this with its own router, attention and dense layers.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from vbatch.engine.layers.activation import gated_activation
from vbatch.engine.layers.moe import (
    SparseMoeBlock,
    check_experts_loaded,
    expert_checkpoint_tensors,
)
from vbatch.engine.layers.self_attention import AttentionOptions
from vbatch.engine.models.base import sliding_window_of
from vbatch.engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vbatch.parallel.state import ParallelState


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral (see module docstring)."""

    # per-expert checkpoint sub-names -> part of the fused expert parameters
    expert_parts = {"w1": "gate", "w3": "up", "w2": "down"}

    @classmethod
    def refusals(cls, config, max_model_len: int) -> list[str]:
        """Config fields whose math this class does not implement."""
        refused = []
        try:
            gated_activation(config.hidden_act, torch.float32, torch.device("cpu"))
        except ValueError as error:
            refused.append(f"hidden_act: {error}")
        experts, top_k = cls.num_experts_of(config), config.num_experts_per_tok
        if experts > 0 and not 0 < top_k <= experts:
            refused.append(f"num_experts_per_tok={top_k} is not in 1..{experts} (the number "
                           "of experts)")
        # router_jitter_noise, router_aux_loss_coef, output_router_logits: training only.
        return refused

    @staticmethod
    def num_experts_of(config) -> int:
        return config.num_local_experts

    def attention_options(self, layer_index: int) -> AttentionOptions:
        """No biases (HF's MixtralAttention has none); Mistral's window on every layer."""
        return AttentionOptions(sliding_window=sliding_window_of(self.config, layer_index))

    def make_mlp(self, layer_index: int, ps: ParallelState, dtype: torch.dtype) -> nn.Module:
        """The feed-forward block of layer `layer_index`."""
        config = self.config
        return SparseMoeBlock(config.hidden_size, config.intermediate_size,
                              config.num_local_experts, config.num_experts_per_tok,
                              config.hidden_act, ps, dtype, renormalize=True,
                              weights_in_hidden_dtype=False)

    def make_layer(self, layer_index: int, ps: ParallelState, dtype: torch.dtype) -> nn.Module:
        return LlamaDecoderLayer(self.config, ps, dtype, self.rotary_emb,
                                 self.attention_options(layer_index),
                                 mlp=self.make_mlp(layer_index, ps, dtype))

    def checkpoint_tensors(self, weights: Iterable[tuple[str, object]]
                           ) -> Iterator[tuple[str, object]]:
        renamed = ((name.replace(".block_sparse_moe.", ".mlp."), tensor)
                   for name, tensor in weights)
        return expert_checkpoint_tensors(renamed, self.expert_parts)

    def load_weights(self, weights: Iterable[tuple[str, object]]) -> set[str]:
        loaded = super().load_weights(weights)
        check_experts_loaded(self)
        return loaded
