"""Qwen3-MoE: Qwen3 (per-head q_norm / k_norm, explicit head_dim, `attention_bias`) whose
feed-forward blocks are sparse mixtures of experts, except where the config says dense.

What differs from LLaMA: layer i is a `SparseMoeBlock` (layers/moe.py) of `num_experts`
SiLU-gated experts of `moe_intermediate_size` when i is not in `mlp_only_layers` and
(i + 1) % `decoder_sparse_step` == 0, else a dense GatedMLP of `intermediate_size`. The router
takes softmax in float32, the top `num_experts_per_tok`, renormalises them only if
`norm_topk_prob`, and casts the weights back to the hidden dtype (as Hugging Face does). A
sliding window (`use_sliding_window`) applies to every layer, as in HF's Qwen3MoeAttention.

Checkpoints: `mlp.gate`, `mlp.experts.{e}.gate_proj|up_proj|down_proj` (Hub and
`save_pretrained`), or transformers 5's fused `mlp.experts.gate_up_proj` / `down_proj`.
"""
from __future__ import annotations

import torch
from torch import nn

from vbatch.engine.layers.mlp import GatedMLP
from vbatch.engine.layers.moe import SparseMoeBlock
from vbatch.engine.models.mixtral import MixtralForCausalLM
from vbatch.engine.models.qwen3 import Qwen3ForCausalLM
from vbatch.parallel.state import ParallelState


class Qwen3MoeForCausalLM(MixtralForCausalLM):
    """Qwen3-MoE (see module docstring)."""

    expert_parts = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    attention_options = Qwen3ForCausalLM.attention_options

    @classmethod
    def refusals(cls, config, max_model_len: int) -> list[str]:
        refused = super().refusals(config, max_model_len)
        for name in ("shared_expert_intermediate_size", "n_shared_experts",
                     "num_shared_experts"):
            if getattr(config, name, None):
                refused.append(f"{name}={getattr(config, name)!r}: shared experts are not "
                               "implemented (Qwen3-MoE has none)")
        return refused

    @staticmethod
    def num_experts_of(config) -> int:
        return config.num_experts

    def is_sparse(self, layer_index: int) -> bool:
        """Whether layer `layer_index` is a MoE layer (HF's Qwen3MoeDecoderLayer rule)."""
        config = self.config
        return (layer_index not in (config.mlp_only_layers or []) and config.num_experts > 0
                and (layer_index + 1) % config.decoder_sparse_step == 0)

    def make_mlp(self, layer_index: int, ps: ParallelState, dtype: torch.dtype) -> nn.Module:
        config = self.config
        if not self.is_sparse(layer_index):
            return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, ps,
                            dtype)
        return SparseMoeBlock(config.hidden_size, config.moe_intermediate_size,
                              config.num_experts, config.num_experts_per_tok, config.hidden_act,
                              ps, dtype, renormalize=bool(config.norm_topk_prob),
                              weights_in_hidden_dtype=True)
