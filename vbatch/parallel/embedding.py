"""Vocabulary-parallel token embedding and LM head.

The vocabulary V is padded to V_pad, a multiple of tp, and rank i owns token rows
[i*V_pad/tp, (i+1)*V_pad/tp). Rows past V are padding: zero in the embedding, and their logits are
cut off after the gather, so they can never be sampled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vbatch.parallel.comm import GroupCoordinator
from vbatch.parallel.cpu_packed import PackedWeight, can_pack


def pad_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Smallest multiple of tp_size that is >= vocab_size."""
    return -(-vocab_size // tp_size) * tp_size


class VocabParallelEmbedding(nn.Module):
    """E[ids]: each rank looks up the ids it owns, zeroes the rest, and one all-reduce sums."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group: GroupCoordinator,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.tp_group = tp_group
        self.tp_rank = tp_group.rank_in_group
        self.tp_size = tp_group.world_size
        self.num_embeddings = num_embeddings
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, self.tp_size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=dtype,
                        device=device), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        """Copy this rank's rows of the [V, dim] checkpoint tensor; padding rows become zero."""
        if loaded.shape[0] != self.num_embeddings:
            raise ValueError(f"embedding checkpoint has {loaded.shape[0]} rows, the config says "
                             f"vocab_size={self.num_embeddings}")
        num_real = max(0, min(self.vocab_end_index, self.num_embeddings) - self.vocab_start_index)
        param.data.zero_()
        if num_real:
            param.data[:num_real].copy_(loaded.narrow(0, self.vocab_start_index, num_real))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)
        local_ids = torch.where(in_range, input_ids - self.vocab_start_index, 0)
        out = F.embedding(local_ids, self.weight)
        out.masked_fill_(~in_range.unsqueeze(-1), 0)
        return self.tp_group.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """logits = h W^T over the vocabulary shards, gathered on every TP rank, padding cut off.

    With tied embeddings, construct it with `tie_to=embedding` and it shares that weight.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group: GroupCoordinator,
                 dtype: torch.dtype, device: torch.device,
                 tie_to: VocabParallelEmbedding | None = None):
        super().__init__(num_embeddings, embedding_dim, tp_group=tp_group, dtype=dtype,
                         device=device)
        self.tied = tie_to is not None
        self.packed_weight: PackedWeight | None = None
        if tie_to is not None:
            self.weight = tie_to.weight

    def pack_weight(self) -> None:
        """After loading: a oneDNN-packed copy of the head for the logits matmul (CPU bf16, see
        cpu_packed.py). A tied head keeps the embedding's weight for lookups, so only then is
        the weight held twice."""
        if self.packed_weight is not None or not can_pack(self.weight):
            return
        self.packed_weight = PackedWeight(self.weight)
        if not self.tied:
            self.weight = None

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, V] logits (every TP rank gets the full row)."""
        if self.packed_weight is not None:
            logits = self.packed_weight.linear(hidden_states)
        else:
            logits = F.linear(hidden_states, self.weight)
        logits = self.tp_group.all_gather(logits, dim=-1)
        if self.num_embeddings_padded != self.num_embeddings:
            logits = logits[..., : self.num_embeddings]
        return logits
