"""Paged attention in plain PyTorch: write the step's keys/values into the KV cache, then attend.

The cache of one layer is [2 (keys, values), num_kv_heads, num_blocks, block_size, head_dim]:
head-major, so gathering a batch's blocks (`index_select` on the block dimension) directly
yields [num_kv_heads * B, context, head_dim], the layout attention consumes, with no copy. Per step,
`AttentionMetadata` (built once, shared by all layers) says where each new token's key/value
goes (`slot_mapping`, slot = block * block_size + offset) and which blocks hold each sequence's
context, in order (`block_tables`, padded with the null block 0). Keys are gathered a whole
block at a time; positions past a sequence's context are masked out. Query i of a sequence with
`context_len` tokens (the last `query_len` of them new) may attend to key positions
<= context_len - query_len + i.

Per layer, two options change the scores (see `PagedAttention`): a sliding window of W keys
(Hugging Face's `sliding_window_overlay`: query at position p sees keys p - W < k <= p) and
attention-logit soft-capping (Gemma 2: s = c * tanh(s / c) before masking and softmax).

GQA without copying keys: the query heads sharing one KV head are folded into the query length,
q: [num_kv_heads * B, 1, group * Lq, d] against k, v: [num_kv_heads * B, 1, Lk, d]. The PyTorch
path attends in `AttentionChunk`s of consecutive sequences (all decodes or all prefills), each
padded to its own longest query and context, its masks built on first use on the device.

On CUDA (unless `VBATCH_TRITON_ATTENTION=0`) the keys/values are written as above and every
token attends straight from the cache blocks with the Triton kernel of
kernels/triton_attention.py (the native CPU kernel's contract: no gather, no mask, no padding).

On CPU, when the native kernels are available (kernels/cpu_kernels.py), the kernels write the
new keys/values and every token attends straight from the cache blocks over its own causal
context (`token_seq_index`, `token_context_lens`), without gathering or masks. Measured on the
2-core CPU (9 heads / 3 KV heads of 64): as fast as or faster than the gather + SDPA path
from 32-token to 2048-token prompts, and 4x (bf16) to 18x (float32) faster for decode
(benchmarks/cpu_kernels.py).
"""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vbatch.engine.kernels.cpu_kernels import CpuKernels, cpu_kernels_for
from vbatch.env import TRITON_ATTENTION


@dataclass
class AttentionChunk:
    """Consecutive sequences the PyTorch path attends together: block-table rows [start, end),
    their new tokens [token_start, token_end) of the step, each one's query and context
    lengths; it reads only its first `num_blocks` block-table columns. Queries are padded to
    the chunk's own longest query (`max_query_len`): decodes (1 token) and prefills are never
    in one chunk, so a decode is never padded to a prompt's length. Masks and padding indices
    are built on first use (the native kernels need none), on the lengths' device, once per
    step for all layers."""

    start: int
    end: int
    num_blocks: int
    token_start: int
    token_end: int
    max_query_len: int
    query_lens: torch.Tensor      # [rows] int64
    context_lens: torch.Tensor    # [rows] int64
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_rows(self) -> int:
        return self.end - self.start

    def pad_index(self) -> torch.Tensor:
        """[rows, Lq] index into the chunk's new tokens of each padded query (a padding query
        repeats its sequence's last token)."""
        index = self._cache.get("pad")
        if index is None:
            offsets = torch.arange(self.max_query_len, device=self.query_lens.device)
            first = torch.cumsum(self.query_lens, 0) - self.query_lens
            index = first.unsqueeze(1) + torch.minimum(offsets.unsqueeze(0),
                                                       (self.query_lens - 1).unsqueeze(1))
            self._cache["pad"] = index
        return index

    def unpad_index(self) -> torch.Tensor:
        """[tokens] index into the flattened [rows * Lq] padded queries of each real one."""
        index = self._cache.get("unpad")
        if index is None:
            device = self.query_lens.device
            rows = torch.repeat_interleave(torch.arange(self.num_rows, device=device),
                                           self.query_lens)
            first = torch.cumsum(self.query_lens, 0) - self.query_lens
            offset = torch.arange(int(rows.numel()), device=device) - first[rows]
            index = rows * self.max_query_len + offset
            self._cache["unpad"] = index
        return index

    def mask(self, block_size: int, window: int | None = None) -> torch.Tensor:
        """[rows, 1, Lq, num_blocks * block_size] bool, True where a query may attend: query i
        of a sequence with context c (the last q new) sees keys k <= c - q + i (a padding
        query its whole context) and, with a sliding `window`, only k > its position - W."""
        key = ("mask", block_size, window)
        mask = self._cache.get(key)
        if mask is None:
            device = self.query_lens.device
            key_pos = torch.arange(self.num_blocks * block_size, device=device)
            offsets = torch.arange(self.max_query_len, device=device)
            last = (self.context_lens - 1).unsqueeze(1)
            q_pos = torch.minimum(last - self.query_lens.unsqueeze(1) + 1 + offsets, last)
            mask = key_pos.view(1, 1, -1) <= q_pos.unsqueeze(-1)            # [rows, Lq, K]
            if window is not None:
                mask &= key_pos.view(1, 1, -1) > q_pos.unsqueeze(-1) - window
            mask = mask.unsqueeze(1)
            self._cache[key] = mask
        return mask

    def head_major_mask(self, num_kv_heads: int, group: int, block_size: int,
                        window: int | None = None) -> torch.Tensor:
        """`mask` laid out for head-major attention: [num_kv_heads * rows, 1, group * Lq, K]."""
        key = ("head_major", num_kv_heads, group, block_size, window)
        mask = self._cache.get(key)
        if mask is None:
            rows, lq = self.num_rows, self.max_query_len
            mask = self.mask(block_size, window).view(1, rows, 1, lq, -1)
            mask = mask.expand(num_kv_heads, rows, group, lq, -1)
            mask = mask.reshape(num_kv_heads * rows, 1, group * lq, -1)
            self._cache[key] = mask
        return mask


@dataclass
class AttentionMetadata:
    """Per-step tensors shared by every attention layer (see module docstring).

    slot_mapping:       [T]      cache slot of each new token (T = all new tokens of the step)
    block_tables:       [B, Nb]  cache blocks of each sequence's context, padded with block 0
    token_seq_index:    [T]      block_tables row of each new token
    token_context_lens: [T]      cache positions each new token may attend to (its position + 1)
    max_context:        Nb * block_size, an upper bound on any token's context
    chunks:             the `AttentionChunk`s of the PyTorch path, covering all B sequences
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    token_seq_index: torch.Tensor
    token_context_lens: torch.Tensor
    max_context: int
    chunks: list[AttentionChunk]
    host_token_seq_index: torch.Tensor | None = None       # the same two, on the host
    host_token_context_lens: torch.Tensor | None = None
    step_cache: dict = field(default_factory=dict, repr=False)   # per-step, for every layer

    @classmethod
    def build(cls, *, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
              token_seq_index: torch.Tensor, token_context_lens: torch.Tensor,
              query_lens: list[int], context_lens: list[int], block_size: int,
              rows_per_chunk: int, query_lens_tensor: torch.Tensor | None = None,
              context_lens_tensor: torch.Tensor | None = None,
              host_token_seq_index: torch.Tensor | None = None,
              host_token_context_lens: torch.Tensor | None = None) -> AttentionMetadata:
        """The step's metadata for sequences in the given order (`query_lens`, `context_lens`
        per sequence, as lists, and optionally already as int64 tensors on the step's device;
        the other tensors on that device). A chunk holds at most `rows_per_chunk` consecutive
        sequences, all decodes or all prefills."""
        device = block_tables.device
        if query_lens_tensor is None:
            query_lens_tensor = torch.tensor(query_lens, dtype=torch.int64, device=device)
        if context_lens_tensor is None:
            context_lens_tensor = torch.tensor(context_lens, dtype=torch.int64, device=device)
        chunks, start, token_start = [], 0, 0
        while start < len(query_lens):
            is_decode = query_lens[start] == 1
            end = start + 1
            while (end < len(query_lens) and end - start < rows_per_chunk
                   and (query_lens[end] == 1) == is_decode):
                end += 1
            num_tokens = sum(query_lens[start:end])
            chunks.append(AttentionChunk(
                start, end, -(-max(context_lens[start:end]) // block_size), token_start,
                token_start + num_tokens, max(query_lens[start:end]),
                query_lens_tensor[start:end], context_lens_tensor[start:end]))
            start, token_start = end, token_start + num_tokens
        return cls(slot_mapping, block_tables, token_seq_index, token_context_lens,
                   block_tables.shape[1] * block_size, chunks, host_token_seq_index,
                   host_token_context_lens)


def allocate_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled [2, num_kv_heads, num_blocks, block_size, head_dim] cache (keys, values).

    On CPU the cache is an anonymous memory map: the budget is reserved, but pages become
    resident only once blocks are written. It asks for transparent huge pages where the kernel
    offers them: first-touching a cache of hundreds of MB in 4 KiB pages costs a page fault per
    4 KiB, which measurably slowed the first prefill. Zero (never uninitialised) memory
    matters: masked positions are still multiplied by 0, and 0 * NaN would poison the output.
    """
    shape = (2, num_kv_heads, num_blocks, block_size, head_dim)
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = math.prod(shape) * torch.finfo(dtype).bits // 8
    region = mmap.mmap(-1, max(num_bytes, 1))
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8, count=num_bytes).view(dtype).view(shape)


class PagedAttention(nn.Module):
    """softmax(cap(q k^T * scale) + mask) v over a sequence's cached context, for one rank's
    heads.

    mask: causal (query at position p sees keys k <= p); with `sliding_window` W also
    k > p - W, Hugging Face's sliding window (Mistral, Qwen2, Gemma 2). cap(s) = s, or with
    `logit_softcap` c, c * tanh(s / c) (Gemma 2's attention soft-capping). None (the default)
    turns either off, and then nothing is computed differently from plain causal attention.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, *,
                 sliding_window: int | None = None, logit_softcap: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = _checked_window(sliding_window)
        self.logit_softcap = _checked_softcap(logit_softcap)
        self.group = num_heads // num_kv_heads
        self.kv_cache: torch.Tensor | None = None
        self.kernels: CpuKernels | None = None
        self.triton = None            # the Triton kernels' module, on a CUDA cache

    def bind_cache(self, kv_cache: torch.Tensor) -> None:
        """Attach this layer's cache, as made by `allocate_kv_cache` (and pick the native CPU
        kernels when they are built and support its dtype and head size)."""
        self.kv_cache = kv_cache
        self.kernels = cpu_kernels_for(kv_cache.device, kv_cache.dtype, self.head_dim)
        self.triton = None
        if kv_cache.device.type == "cuda" and TRITON_ATTENTION.read():
            from vbatch.engine.kernels import triton_attention  # noqa: PLC0415 - triton loads only for CUDA caches
            if triton_attention.is_available(kv_cache.device):
                self.triton = triton_attention

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H*d], k/v [T, Hkv*d] for the step's new tokens -> [T, H*d]."""
        num_tokens = q.shape[0]
        d, hkv, group = self.head_dim, self.num_kv_heads, self.group
        k_cache, v_cache = self.kv_cache[0], self.kv_cache[1]     # [Hkv, blocks, block, d]
        if self.kernels is not None:
            self.kernels.write_kv_cache(self.kv_cache, k, v, meta.slot_mapping)
            return self.kernels.paged_attention(
                q, self.kv_cache, meta.block_tables, meta.token_seq_index,
                meta.token_context_lens, meta.max_context, self.num_heads, self.scale,
                window=self.sliding_window or 0, softcap=self.logit_softcap or 0.0)
        else:
            k_cache.view(hkv, -1, d)[:, meta.slot_mapping] = \
                k.view(num_tokens, hkv, d).transpose(0, 1)
            v_cache.view(hkv, -1, d)[:, meta.slot_mapping] = \
                v.view(num_tokens, hkv, d).transpose(0, 1)
            if self.triton is not None:
                return self.triton.paged_attention(
                    q, self.kv_cache, meta.block_tables, meta.token_seq_index,
                    meta.token_context_lens, meta.max_context, self.num_heads, self.scale,
                    window=self.sliding_window or 0, softcap=self.logit_softcap or 0.0,
                    tiles=self._triton_tiles(meta))
        block_size = k_cache.shape[2]
        q = q.view(num_tokens, hkv, group, d)
        out = torch.empty(num_tokens, hkv * group * d, dtype=q.dtype, device=q.device)
        # Gather and attend a chunk of sequences at a time: the gathered keys/values stay in
        # cache between the copy and the attention that reads them.
        for chunk in meta.chunks:
            rows, lq = chunk.num_rows, chunk.max_query_len
            q_chunk = q[chunk.token_start:chunk.token_end]
            q_chunk = (q_chunk.view(rows, 1, hkv, group, d) if lq == 1
                       else q_chunk[chunk.pad_index()])                 # [n, Lq, Hkv, g, d]
            blocks = meta.block_tables[chunk.start:chunk.end, :chunk.num_blocks].reshape(-1)
            keys = k_cache.index_select(1, blocks).view(hkv * rows, 1, -1, d)
            values = v_cache.index_select(1, blocks).view(hkv * rows, 1, -1, d)
            q_chunk = q_chunk.permute(2, 0, 3, 1, 4).reshape(hkv * rows, 1, group * lq, d)
            mask = chunk.head_major_mask(hkv, group, block_size, self.sliding_window)
            if self.logit_softcap is not None or (lq == 1 and q.dtype != torch.float32):
                attended = _matmul_attention(q_chunk, keys, values, mask, self.scale,
                                             self.logit_softcap)
            else:
                attended = F.scaled_dot_product_attention(q_chunk, keys, values, attn_mask=mask,
                                                          scale=self.scale)  # [Hkv*n,1,g*Lq,d]
            attended = attended.view(hkv, rows, group, lq, d).permute(1, 3, 0, 2, 4)
            attended = attended.reshape(rows * lq, hkv * group * d)
            out[chunk.token_start:chunk.token_end] = (attended if lq == 1
                                                      else attended[chunk.unpad_index()])
        return out

    def _triton_tiles(self, meta: AttentionMetadata):
        """The Triton kernel's query-tile table of this step for this layer's head layout,
        built once per step from the host tensors and shared by the step's layers (None
        without host tensors: the kernel then builds and checks it itself)."""
        if meta.host_token_seq_index is None:
            return None
        block_q = self.triton.prefill_tile_tokens(self.num_heads, self.num_kv_heads,
                                                  self.head_dim)
        key = ("triton_tiles", block_q)
        tiles = meta.step_cache.get(key)
        if tiles is None:
            tiles = self.triton.checked_tile_table(
                meta.host_token_seq_index, meta.host_token_context_lens, block_q,
                meta.block_tables.shape[0], meta.max_context).to(meta.block_tables.device)
            meta.step_cache[key] = tiles
        return tiles


def _matmul_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor, scale: float,
                      softcap: float | None = None) -> torch.Tensor:
    """Attention by explicit matmuls with a float32 softmax: softmax(cap(q k^T * scale)) v,
    cap(s) = softcap * tanh(s / softcap) (in float32), or s without a softcap.

    The same numerics as Hugging Face's eager attention (q k^T rounded to the model dtype,
    softmax in float32). Used for bf16/fp16 decode: on CPU it is ~3x faster than the flash
    kernel of `scaled_dot_product_attention` for a few query rows per KV head, where that
    kernel's per-head set-up dominates (float32 models keep SDPA, so float32 results stay
    reference-exact). Also for every soft-capped layer, since SDPA cannot cap its scores.
    """
    scores = torch.matmul(q, keys.transpose(-1, -2)).float()
    scores.mul_(scale)
    if softcap is not None:
        scores = torch.tanh(scores.div_(softcap)).mul_(softcap)
    scores.masked_fill_(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), values)


def _checked_window(window) -> int | None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window <= 0):
        raise ValueError(f"sliding_window must be a positive int (how many of the latest keys "
                         f"each query sees, itself included) or None for full causal "
                         f"attention, got {window!r}")
    return window


def _checked_softcap(softcap) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) \
            or not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"logit_softcap must be a positive finite float (scores become "
                         f"c * tanh(s / c), e.g. 50.0 for Gemma 2) or None for no capping, "
                         f"got {softcap!r}")
    return float(softcap)
