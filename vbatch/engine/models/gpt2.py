"""GPT-2 on the parallel layer API.

x = wte(ids) + wpe(positions); per block: x = x + c_proj(attn(c_attn(ln_1(x)))),
x = x + c_proj(act(c_fc(ln_2(x)))); logits = ln_f(x) wte^T (the head is tied to wte).
GPT-2 checkpoints store Conv1D weights as [in, out]: they are read transposed, and the fused
c_attn [q | k | v] is split per head before sharding.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vbatch.engine.attention import AttentionMetadata, PagedAttention
from vbatch.engine.models.loading import load_named_weights
from vbatch.parallel.embedding import ParallelLMHead, VocabParallelEmbedding
from vbatch.parallel.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vbatch.parallel.pipeline import PPMissingLayer, layer_range
from vbatch.parallel.state import ParallelState

_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                   "mlp.c_proj.weight")


def _layer_norm(size: int, eps: float, dtype: torch.dtype, device: torch.device) -> nn.LayerNorm:
    norm = nn.LayerNorm(size, eps=eps, dtype=dtype, device=device)
    norm.requires_grad_(False)
    return norm


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
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise ValueError("scale_attn_by_inverse_layer_idx is not supported")
        self.attn = PagedAttention(self.c_attn.num_heads, self.c_attn.num_heads, head_dim, scale)

    def forward(self, x, meta: AttentionMetadata):
        q, k, v = self.c_attn(x).split([self.q_size] * 3, dim=-1)
        return self.c_proj(self.attn(q, k, v, meta))


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
    def __init__(self, config, ps: ParallelState, dtype: torch.dtype):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = _layer_norm(config.hidden_size, eps, dtype, ps.device)
        self.attn = GPT2Attention(config, ps, dtype)
        self.ln_2 = _layer_norm(config.hidden_size, eps, dtype, ps.device)
        self.mlp = GPT2MLP(config, ps, dtype)

    def forward(self, x, meta):
        x = x + self.attn(self.ln_1(x), meta)
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(nn.Module):
    """Our GPT-2: forward(token ids, positions, metadata[, hidden]) -> hidden; compute_logits.

    Under pipeline parallelism this rank builds only its stage (blocks [start_layer,
    end_layer); wte and wpe on the first stage; ln_f and the LM head, tied to wte, on the last,
    which loads wte itself when it is not also the first stage).
    """

    def __init__(self, config, ps: ParallelState, dtype: torch.dtype, max_position: int):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.is_first_stage, self.is_last_stage = ps.pp.is_first_rank, ps.pp.is_last_rank
        self.start_layer, self.end_layer = layer_range(config.n_layer, ps.pp_rank, ps.pp_size)
        if self.is_first_stage:
            self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                              tp_group=ps.tp, dtype=dtype, device=ps.device)
            self.wpe = nn.Embedding(config.n_positions, config.hidden_size, dtype=dtype,
                                    device=ps.device)
            self.wpe.requires_grad_(False)
        self.h = nn.ModuleList(
            GPT2Block(config, ps, dtype) if self.start_layer <= i < self.end_layer
            else PPMissingLayer() for i in range(config.n_layer))
        if self.is_last_stage:
            self.ln_f = _layer_norm(config.hidden_size, config.layer_norm_epsilon, dtype,
                                    ps.device)
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          tp_group=ps.tp, dtype=dtype, device=ps.device,
                                          tie_to=self.wte if self.is_first_stage else None)

    def local_blocks(self) -> list[GPT2Block]:
        return list(self.h[self.start_layer:self.end_layer])

    def attention_layers(self) -> list[PagedAttention]:
        return [block.attn.attn for block in self.local_blocks()]

    def forward(self, input_ids, positions, meta: AttentionMetadata,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """First stage: embeds; later stages continue from `hidden`; the last applies ln_f."""
        x = self.wte(input_ids) + self.wpe(positions) if self.is_first_stage else hidden
        for block in self.local_blocks():
            x = block(x, meta)
        return self.ln_f(x) if self.is_last_stage else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, object]]) -> set[str]:
        """Load HF GPT-2 tensors of this stage (Conv1D weights transposed on read)."""
        def transposed(items):
            for name, tensor in items:
                if name.endswith(_CONV1D_WEIGHTS):
                    tensor = TransposedView(tensor)
                yield name, tensor

        def rename(name: str) -> str | None:
            if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
                return None  # causal-mask buffers of old checkpoints; the head is tied
            name = name.removeprefix("transformer.")
            if name == "wte.weight":
                if self.is_first_stage:
                    return name
                return "lm_head.weight" if self.is_last_stage else None
            if name.startswith("wpe."):
                return name if self.is_first_stage else None
            if name.startswith("ln_f."):
                return name if self.is_last_stage else None
            if name.startswith("h."):
                index = int(name.split(".")[1])
                return name if self.start_layer <= index < self.end_layer else None
            return name
        return load_named_weights(self, transposed(weights), rename)


class TransposedView:
    """A 2-D checkpoint tensor seen transposed, still read lazily one slice at a time."""

    def __init__(self, inner):
        self.inner = inner
        rows, cols = tuple(inner.shape)
        self.shape = (cols, rows)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.inner.narrow(1 - dim, start, length).t()
