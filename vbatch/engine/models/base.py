"""The decoder-only causal LM that every model file builds on.

It owns what all of them share: pipeline-stage placement (this rank builds layers
[start_layer, end_layer); the embedding on the first stage; the final norm and LM head on the
last; parameter-free placeholders elsewhere), the tied or untied LM head (a last stage that is
not also the first loads the embedding matrix into its own head), the residual-stream loop, and
the checkpoint-name mapping. A model file declares its decoder layer (`make_layer`), its norm,
its rotary embedding(s) and the checkpoint names of its parts; hooks cover the differences
(Gemma's scaled embedding, final-logit softcapping, fused checkpoint tensors).

Decoder layers take and return (x, residual), vLLM's layout: the residual after a layer is the
stream so far, and the caller adds the returned output at the next norm. One tensor, x +
residual, crosses a pipeline-stage boundary.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from vbatch.engine.layers.attention import AttentionMetadata, PagedAttention
from vbatch.engine.layers.forward_context import ForwardContext
from vbatch.engine.models.loading import StackedParam, load_named_weights
from vbatch.parallel.embedding import ParallelLMHead, VocabParallelEmbedding
from vbatch.parallel.pipeline import PPMissingLayer, layer_range
from vbatch.parallel.state import ParallelState

QKV_STACKED = (StackedParam("qkv_proj", "q_proj", "q"), StackedParam("qkv_proj", "k_proj", "k"),
               StackedParam("qkv_proj", "v_proj", "v"))
GATE_UP_STACKED = (StackedParam("gate_up_proj", "gate_proj", 0),
                   StackedParam("gate_up_proj", "up_proj", 1))


def head_dim_of(config) -> int:
    """The config's explicit head_dim, else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_type_of(config, layer_index: int) -> str:
    """"sliding_attention" or "full_attention" for a layer, from the config's `layer_types`
    (Qwen2/3, Gemma 2/3: transformers derives them from use_sliding_window, max_window_layers,
    the sliding pattern), else from `sliding_window` alone (Mistral, Mixtral: every layer)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[layer_index]
    window = getattr(config, "sliding_window", None)
    return "sliding_attention" if window else "full_attention"


def sliding_window_of(config, layer_index: int) -> int | None:
    """The window W of a layer (it attends to the last W positions), or None."""
    if layer_type_of(config, layer_index) != "sliding_attention":
        return None
    window = getattr(config, "sliding_window", None)
    if not window:
        raise ValueError(f"config marks layer {layer_index} as sliding_attention but gives no "
                         "sliding_window")
    return int(window)


class DecoderForCausalLM(nn.Module):
    """forward(token ids, positions, metadata[, hidden]) -> hidden; compute_logits(hidden).

    Subclasses set the checkpoint names and implement `make_layer`, `make_norm`; they may
    override `make_rotary`, `embed`, `compute_logits` and `checkpoint_tensors`.
    """

    checkpoint_prefix = "model."        # of the decoder's tensors; the head is "lm_head."
    embed_name, layers_name, norm_name = "embed_tokens", "layers", "norm"
    first_stage_names: tuple[str, ...] = ()          # other modules of the first stage only
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    stacked_params: tuple[StackedParam, ...] = QKV_STACKED + GATE_UP_STACKED
    always_tied = False                 # the head is the embedding whatever the config says

    def __init__(self, config, ps: ParallelState, dtype: torch.dtype, max_position: int):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.tie_word_embeddings = self.always_tied or bool(
            getattr(config, "tie_word_embeddings", False))
        self.is_first_stage, self.is_last_stage = ps.pp.is_first_rank, ps.pp.is_last_rank
        num_layers = config.num_hidden_layers
        self.start_layer, self.end_layer = layer_range(num_layers, ps.pp_rank, ps.pp_size)
        self.rotary_emb = self.make_rotary(ps, dtype, max_position)
        if self.is_first_stage:
            setattr(self, self.embed_name, VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, tp_group=ps.tp, dtype=dtype,
                device=ps.device))
        setattr(self, self.layers_name, nn.ModuleList(
            self.make_layer(i, ps, dtype) if self.start_layer <= i < self.end_layer
            else PPMissingLayer() for i in range(num_layers)))
        if self.is_last_stage:
            setattr(self, self.norm_name, self.make_norm(ps, dtype))
            tie_to = (getattr(self, self.embed_name)
                      if self.tie_word_embeddings and self.is_first_stage else None)
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          tp_group=ps.tp, dtype=dtype, device=ps.device,
                                          tie_to=tie_to)

    # -- what a model file declares -------------------------------------------------------
    def make_layer(self, layer_index: int, ps: ParallelState, dtype: torch.dtype) -> nn.Module:
        """Decoder layer `layer_index`: forward(x, residual, ctx) -> (x, residual)."""
        raise NotImplementedError

    def make_norm(self, ps: ParallelState, dtype: torch.dtype) -> nn.Module:
        """The final norm (the fused-residual calling convention of layers/norm.py)."""
        raise NotImplementedError

    def make_rotary(self, ps: ParallelState, dtype: torch.dtype, max_position: int):
        """Rotary embedding module(s) the layers share, or None (learned positions)."""
        return None

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """First stage: token ids -> hidden states."""
        return getattr(self, self.embed_name)(input_ids)

    def checkpoint_tensors(self, weights: Iterable[tuple[str, object]]
                           ) -> Iterator[tuple[str, object]]:
        """The checkpoint's (name, tensor) pairs as this model's loader expects them (a hook
        for fused or transposed checkpoint tensors)."""
        return iter(weights)

    # -- shared -----------------------------------------------------------------------------
    def local_layers(self) -> list[nn.Module]:
        return list(getattr(self, self.layers_name)[self.start_layer:self.end_layer])

    def attention_layers(self) -> list[PagedAttention]:
        return [module for layer in self.local_layers() for module in layer.modules()
                if isinstance(module, PagedAttention)]

    def forward(self, input_ids, positions, meta: AttentionMetadata,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """First stage: embeds `input_ids`; later stages continue from `hidden`. The last stage
        returns normed hidden states, the others their layers' output with the residual summed
        in."""
        x = self.embed(input_ids, positions) if self.is_first_stage else hidden
        residual, ctx = None, ForwardContext(positions, meta)
        for layer in self.local_layers():
            x, residual = layer(x, residual, ctx)
        norm = getattr(self, self.norm_name, None) if self.is_last_stage else None
        if residual is None:                 # a stage without layers
            return norm(x) if norm is not None else x
        if norm is not None:
            return norm(x, residual)[0]
        return x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, object]]) -> set[str]:
        """Load this stage's checkpoint tensors (HF names); returns the parameters loaded.
        ValueError if a tensor has no home or a parameter stays unloaded."""
        return load_named_weights(self, self.checkpoint_tensors(weights), self._rename,
                                  self.stacked_params)

    def _rename(self, name: str) -> str | None:
        """Checkpoint name -> our parameter name on this stage, or None to skip it."""
        if name.endswith(self.ignored_suffixes):
            return None
        if name == "lm_head.weight":
            return name if self.is_last_stage and not self.tie_word_embeddings else None
        name = name.removeprefix(self.checkpoint_prefix)
        part = name.split(".", 1)[0]
        if part == self.embed_name:
            if self.is_first_stage:
                return name
            return ("lm_head.weight" if self.is_last_stage and self.tie_word_embeddings
                    else None)
        if part in self.first_stage_names:
            return name if self.is_first_stage else None
        if part == self.norm_name:
            return name if self.is_last_stage else None
        if part == self.layers_name:
            index = int(name.split(".")[1])
            return name if self.start_layer <= index < self.end_layer else None
        return name
