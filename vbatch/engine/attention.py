"""Paged attention in plain PyTorch: write the step's keys/values into the KV cache, then attend.

The cache of one layer is two tensors [num_slots, num_kv_heads, head_dim] (num_slots =
num_blocks * block_size). Per step, `AttentionMetadata` (built once, shared by all layers) says
where each new token's key/value goes (`slot_mapping`) and, for each sequence, which slots hold
its context in order (`kv_slot_index`, padded). Query i of a sequence with `context_len` tokens
(of which the last `query_len` are new) may attend to key positions <= context_len - query_len + i.

GQA without copying keys: the query heads sharing one KV head are folded into the query length,
q: [B, num_kv_heads, group * Lq, d] against k, v: [B, num_kv_heads, Lk, d].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """Per-step tensors shared by every attention layer (see module docstring).

    slot_mapping:     [T]      cache slot of each new token (T = all new tokens of the step)
    kv_slot_index:    [B, Lk]  cache slots of each sequence's context, padded with slot 0
    attn_mask:        [B, 1, Lq, Lk] bool, True where query may attend to key
    query_pad_index:  [B, Lq]  index into the T new tokens for each padded query (None if Lq == 1)
    query_unpad_index:[T]      index into the flattened [B * Lq] padded queries (None if Lq == 1)
    """

    slot_mapping: torch.Tensor
    kv_slot_index: torch.Tensor
    attn_mask: torch.Tensor
    query_pad_index: torch.Tensor | None
    query_unpad_index: torch.Tensor | None
    _group_masks: dict = field(default_factory=dict, repr=False)

    @property
    def max_query_len(self) -> int:
        return self.attn_mask.shape[2]

    def mask_for_group(self, group: int) -> torch.Tensor:
        """attn_mask repeated for `group` query heads per KV head: [B, 1, group * Lq, Lk]."""
        mask = self._group_masks.get(group)
        if mask is None:
            batch, _, lq, lk = self.attn_mask.shape
            mask = self.attn_mask.expand(batch, group, lq, lk).reshape(batch, 1, group * lq, lk)
            self._group_masks[group] = mask
        return mask


class PagedAttention(nn.Module):
    """softmax(q k^T * scale + mask) v over a sequence's cached context, for one rank's heads."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.group = num_heads // num_kv_heads
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Attach this layer's KV cache ([num_slots, num_kv_heads, head_dim] each)."""
        self.k_cache, self.v_cache = k_cache, v_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H*d], k/v [T, Hkv*d] for the step's new tokens -> [T, H*d]."""
        num_tokens = q.shape[0]
        d, hkv, group = self.head_dim, self.num_kv_heads, self.group
        self.k_cache[meta.slot_mapping] = k.view(num_tokens, hkv, d)
        self.v_cache[meta.slot_mapping] = v.view(num_tokens, hkv, d)
        keys = self.k_cache[meta.kv_slot_index].transpose(1, 2)    # [B, Hkv, Lk, d]
        values = self.v_cache[meta.kv_slot_index].transpose(1, 2)
        batch = meta.kv_slot_index.shape[0]
        lq = meta.max_query_len
        q = q.view(num_tokens, hkv, group, d)
        if meta.query_pad_index is not None:
            q = q[meta.query_pad_index]                               # [B, Lq, Hkv, g, d]
        else:
            q = q.view(batch, 1, hkv, group, d)
        q = q.permute(0, 2, 3, 1, 4).reshape(batch, hkv, group * lq, d)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=meta.mask_for_group(group),
                                             scale=self.scale)      # [B, Hkv, g*Lq, d]
        out = out.view(batch, hkv, group, lq, d).permute(0, 3, 1, 2, 4)  # [B, Lq, Hkv, g, d]
        out = out.reshape(batch * lq, hkv * group * d)
        if meta.query_unpad_index is not None:
            out = out[meta.query_unpad_index]
        return out
