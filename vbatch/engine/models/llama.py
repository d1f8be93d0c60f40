"""LLaMA-family decoder (Llama 2/3, SmolLM2, Mistral-style configs) on the parallel layer API.

x = embed(ids); per layer: h = x + o_proj(attn(rope(qkv(rms(x))))), x = h + down(silu(gate) *
up)(rms(h)); logits = lm_head(rms(x)). GQA, RoPE with any HF rope scaling, tied or untied head.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vbatch.engine.attention import AttentionMetadata, PagedAttention
from vbatch.engine.kernels.cpu_kernels import cpu_kernels_for
from vbatch.engine.models.loading import StackedParam, load_named_weights
from vbatch.engine.rotary import RotaryEmbedding, RotaryStep
from vbatch.parallel.embedding import ParallelLMHead, VocabParallelEmbedding
from vbatch.parallel.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vbatch.parallel.pipeline import PPMissingLayer, layer_range
from vbatch.parallel.state import ParallelState


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), optionally fused with the residual add before it.

    forward(x) -> rms(x); forward(x, residual) -> (rms(x + residual), x + residual), where the
    native CPU kernel updates `residual` in place (vLLM's fused_add_rms_norm).
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device,
                 kernels=None):
        super().__init__()
        self.eps = eps
        self.normalized_shape = (hidden_size,)
        self.kernels = kernels
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.kernels is not None:
            out = self.kernels.rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is None:
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        residual = x + residual
        return F.rms_norm(residual, self.normalized_shape, self.weight, self.eps), residual


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config, ps: ParallelState, dtype: torch.dtype):
        super().__init__()
        head_dim = head_dim_of(config)
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim,
                                          config.num_attention_heads, config.num_key_value_heads,
                                          bias=bias, tp_group=ps.tp, dtype=dtype, device=ps.device)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                                        bias=bias, tp_group=ps.tp, dtype=dtype, device=ps.device)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.num_heads, self.head_dim = self.qkv_proj.num_heads, head_dim
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.attn = PagedAttention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim,
                                   scale=head_dim ** -0.5)

    def forward(self, rope: RotaryStep, x, meta: AttentionMetadata):
        qkv = self.qkv_proj(x)
        # q and k heads rotated together, in place; q, k, v stay views of qkv.
        rope.rotate_(qkv, self.num_heads + self.num_kv_heads)
        qk_size = self.q_size + self.kv_size
        q, k, v = qkv[:, : self.q_size], qkv[:, self.q_size:qk_size], qkv[:, qk_size:]
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    def __init__(self, config, ps: ParallelState, dtype: torch.dtype, kernels=None):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported LLaMA hidden_act {act!r} (only silu)")
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter],
                                                       bias=bias, tp_group=ps.tp, dtype=dtype,
                                                       device=ps.device)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias, tp_group=ps.tp,
                                           dtype=dtype, device=ps.device)
        self.kernels = kernels

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if self.kernels is not None:
            return self.down_proj(self.kernels.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """One block, carrying the residual stream separately (vLLM's layout): forward(x, residual)
    -> (mlp output, residual), where the residual after the block is x + residual + attention
    output, and the caller adds the returned MLP output at the next norm."""

    def __init__(self, config, ps: ParallelState, dtype: torch.dtype, kernels=None):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype, ps.device, kernels)
        self.self_attn = LlamaAttention(config, ps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype, ps.device,
                                                kernels)
        self.mlp = LlamaMLP(config, ps, dtype, kernels)

    def forward(self, rope: RotaryStep, x, residual, meta):
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(rope, h, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Our LLaMA: forward(token ids, positions, metadata[, hidden]) -> hidden; compute_logits.

    Under pipeline parallelism this rank builds only its stage: layers [start_layer,
    end_layer), the embedding on the first stage, the final norm and LM head on the last (with
    tied embeddings, a last stage that is not also the first loads the embedding matrix into
    its own LM head). Layers of other stages are parameter-free placeholders.
    """

    stacked_params = (
        StackedParam("qkv_proj", "q_proj", "q"),
        StackedParam("qkv_proj", "k_proj", "k"),
        StackedParam("qkv_proj", "v_proj", "v"),
        StackedParam("gate_up_proj", "gate_proj", 0),
        StackedParam("gate_up_proj", "up_proj", 1),
    )

    def __init__(self, config, ps: ParallelState, dtype: torch.dtype, max_position: int):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.is_first_stage, self.is_last_stage = ps.pp.is_first_rank, ps.pp.is_last_rank
        self.start_layer, self.end_layer = layer_range(config.num_hidden_layers, ps.pp_rank,
                                                       ps.pp_size)
        kernels = cpu_kernels_for(ps.device, dtype)
        self.rotary = RotaryEmbedding(config, head_dim_of(config), max_position, dtype,
                                      ps.device, kernels)
        if self.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                       tp_group=ps.tp, dtype=dtype,
                                                       device=ps.device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, ps, dtype, kernels)
            if self.start_layer <= i < self.end_layer
            else PPMissingLayer() for i in range(config.num_hidden_layers))
        if self.is_last_stage:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, ps.device,
                                kernels)
            tie_to = (self.embed_tokens if self.tie_word_embeddings and self.is_first_stage
                      else None)
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          tp_group=ps.tp, dtype=dtype, device=ps.device,
                                          tie_to=tie_to)

    def local_layers(self) -> list[LlamaDecoderLayer]:
        return list(self.layers[self.start_layer:self.end_layer])

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.local_layers()]

    def forward(self, input_ids, positions, meta: AttentionMetadata,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """First stage: embeds `input_ids`; later stages continue from `hidden`. The last stage
        returns normed hidden states, the others their layers' output (the residual stream
        summed in, so one tensor crosses the stage boundary)."""
        x = self.embed_tokens(input_ids) if self.is_first_stage else hidden
        residual, rope = None, self.rotary.at(positions)
        for layer in self.local_layers():
            x, residual = layer(rope, x, residual, meta)
        if residual is None:                 # a stage without layers
            return self.norm(x) if self.is_last_stage else x
        if self.is_last_stage:
            return self.norm(x, residual)[0]
        return x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, object]]) -> set[str]:
        """Load HF-named checkpoint tensors of this stage; returns the parameters loaded."""
        def rename(name: str) -> str | None:
            if "rotary_emb.inv_freq" in name:
                return None
            name = name.removeprefix("model.")
            if name == "lm_head.weight":
                return name if self.is_last_stage and not self.tie_word_embeddings else None
            if name == "embed_tokens.weight":
                if self.is_first_stage:
                    return name
                return "lm_head.weight" if self.is_last_stage and self.tie_word_embeddings \
                    else None
            if name.startswith("norm."):
                return name if self.is_last_stage else None
            if name.startswith("layers."):
                index = int(name.split(".")[1])
                return name if self.start_layer <= index < self.end_layer else None
            return name
        return load_named_weights(self, weights, rename, self.stacked_params)
