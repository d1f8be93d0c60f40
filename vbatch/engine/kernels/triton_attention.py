"""Paged attention for CUDA in Triton: every new token attends straight from the KV-cache blocks.

The same contract as `CpuKernels.paged_attention` (cpu_kernels.py / cpu_attention.c), so
prefill, chunked prefill, decode and mixed steps are one code path without a gather or a mask:

  kv_cache            [2 (k, v), num_kv_heads, num_blocks, block_size, head_dim] (allocate_kv_cache)
  block_tables        [B, Nb] int64 (or int32): each sequence's blocks, in order, padded with 0
  token_seq_index     [T]: the block_tables row of each new token
  token_context_lens  [T]: n, the keys the token may attend to (its position + 1)
  q                   [T, num_heads * head_dim] (rows may be strided), out the same, q's dtype

The new tokens' keys/values are already in the cache (the caller's slot_mapping write). Token t
(position p = n - 1) with query head h, KV head h // (num_heads / num_kv_heads), sees the cached
positions begin..n-1 of its sequence, begin = max(0, n - W) with a sliding window W (Hugging
Face's: p - W < k <= p), begin = 0 for `window=0`:

  out = softmax(cap(scale q K^T)) V,   cap(s) = c tanh(s / c) with `softcap` c, s for c = 0

Scores, softmax and the accumulator are float32 (flash-attention's online softmax: a running
max m and sum l per query row, rescaled as each tile of keys arrives); the probabilities are
rounded to the cache dtype for the P V product (as FlashAttention does), float32 inputs use
IEEE float32 dots (no TF32).

Grid. The host builds a tile table (`build_tile_table`): a run is a maximal stretch of
consecutive tokens of one sequence at consecutive positions (a prefill chunk, or a decode token
alone); each run is cut into tiles of at most BLOCK_Q tokens. One program handles one tile and
one KV head: grid = (tiles, num_kv_heads). Its rows are BLOCK_M = BLOCK_Q * GROUP_PAD query
rows (token-major, then the GROUP query heads of that KV head, padded to a power of two), so
each loaded key/value row serves every token of the tile and every query head of its group.
Token j of a tile starting at context n0 has context n0 + j, so the tile walks the keys
begin(n0)..n0 + len - 2 once, BLOCK_N keys at a time (each key's cache block looked up in the
block table, so any power-of-two block size works); keys before the first token's window and
after the last token's context are never loaded, and the causal / window mask is applied per
row. Single-token tiles (decodes) and longer ones (prefill chunks) are launched separately,
with BLOCK_Q = 1 and BLOCK_Q = BLOCK_M / GROUP_PAD respectively, so a decode program is not
padded to a prefill tile. head_dim is padded to a power of two with masked loads.

The tile table is built on the host: the engine builds it once per step from the step's host
tensors (`AttentionMetadata.step_cache`, shared by the step's layers) and passes `tiles=`;
without it, `paged_attention` copies the token tensors to the host and checks them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: is_available() is False, nothing is compiled
    triton = tl = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HEAD_DIM_LIMIT = 256
_LOG2E = 1.4426950408889634


def is_available(device: torch.device | str) -> bool:
    """Whether the Triton kernel can run on `device`: a CUDA device and an importable triton."""
    return triton is not None and torch.device(device).type == "cuda"


def _jit(fn):
    return triton.jit(fn) if triton is not None else None


@_jit
def _tanh(x):
    """tanh in float32: odd Taylor polynomial through x^9 below |x| = 1/4, above it
    sign(x) (1 - t) / (1 + t) with t = exp(-2|x|) (no cancellation there)."""
    a = tl.abs(x)
    t = tl.exp(-2.0 * a)
    large = (1.0 - t) / (1.0 + t)
    a2 = a * a
    small = a + a * a2 * (-1.0 / 3 + a2 * (2.0 / 15 + a2 * (-17.0 / 315 + a2 * (62.0 / 2835))))
    y = tl.where(a < 0.25, small, large)
    return tl.where(x < 0, -y, y)


@_jit
def _dot(a, b, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """a @ b accumulated in float32; with DOT_F32 on float32 copies of a and b (exact for
    bfloat16 inputs: the interpreter's bfloat16 dot is wrong, numpy has no bfloat16)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@_jit
def _paged_attention_kernel(
        out_ptr, q_ptr, k_ptr, v_ptr, block_tables_ptr, token_ctx_ptr, token_seq_ptr,
        tile_start_ptr, tile_len_ptr,
        stride_out, stride_q, stride_bt, stride_kh, stride_kb, stride_kr,
        stride_vh, stride_vb, stride_vr,
        scale, softcap, window,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr,
        USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
        DOT_F32: tl.constexpr):
    """One tile of <= BLOCK_Q consecutive tokens of one sequence, one KV head (module doc)."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    t0 = tl.load(tile_start_ptr + tile).to(tl.int64)
    num_tokens = tl.load(tile_len_ptr + tile).to(tl.int64)
    seq = tl.load(token_seq_ptr + t0).to(tl.int64)
    ctx0 = tl.load(token_ctx_ptr + t0).to(tl.int64)

    rows = tl.arange(0, BLOCK_M)
    tok = rows // GROUP_PAD
    head = rows % GROUP_PAD
    row_ok = (tok < num_tokens) & (head < GROUP)
    row_ctx = ctx0 + tok                                   # keys row r may see: < row_ctx
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_DIM
    col = (kv_head * GROUP + head) * HEAD_DIM
    q = tl.load(q_ptr + (t0 + tok)[:, None] * stride_q + col[:, None] + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    end = ctx0 + num_tokens - 1                            # the last token's context
    begin = 0
    if USE_WINDOW:
        begin = tl.maximum(ctx0 - window, 0)
    begin = (begin // BLOCK_SIZE) * BLOCK_SIZE             # whole cache blocks from here
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    table = block_tables_ptr + seq * stride_bt
    for start in range(begin, end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        block = tl.load(table + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        offset = keys % BLOCK_SIZE
        k = tl.load(k_base + block[None, :] * stride_kb + offset[None, :] * stride_kr
                    + dims[:, None], mask=key_ok[None, :] & dim_ok[:, None], other=0.0)
        s = _dot(q, k, PRECISION, DOT_F32) * scale          # [BLOCK_M, BLOCK_N]
        if USE_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        visible = keys[None, :] < row_ctx[:, None]
        if USE_WINDOW:
            visible = visible & (keys[None, :] >= row_ctx[:, None] - window)
        s = tl.where(visible, s * 1.4426950408889634, float("-inf"))   # log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)          # rows seeing nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + block[:, None] * stride_vb + offset[:, None] * stride_vr
                    + dims[None, :], mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, DOT_F32)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (t0 + tok)[:, None] * stride_out + col[:, None] + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@dataclass
class TileTable:
    """Query tiles of one step (module doc): `decode` / `prefill` are [2, n] int32 tensors of
    (first token, token count) per tile, single-token tiles and longer ones; `block_q` is the
    prefill tiles' token limit. Build with `build_tile_table`; reusable by every layer."""

    decode: torch.Tensor
    prefill: torch.Tensor
    block_q: int

    def to(self, device: torch.device | str) -> TileTable:
        """The table with its tensors on `device`."""
        return TileTable(self.decode.to(device), self.prefill.to(device), self.block_q)


def prefill_tile_tokens(num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """BLOCK_Q of prefill tiles for this head layout: as many tokens as fit BLOCK_M query
    rows (64, 32 for head_dim > 128) with the group's query heads padded to a power of two."""
    rows = 64 if _next_pow2(head_dim) <= 128 else 32
    return max(1, rows // _next_pow2(num_heads // num_kv_heads))


def build_tile_table(token_seq_index: torch.Tensor, token_context_lens: torch.Tensor,
                     block_q: int) -> TileTable:
    """The tile table of tokens with these block-table rows and contexts (any device: it is
    built on the host, on the tensors' device only if they are on the host already): runs of
    consecutive tokens of one sequence at consecutive positions, cut into <= `block_q` tokens."""
    if block_q < 1:
        raise ValueError(f"build_tile_table: block_q must be >= 1, got {block_q}")
    if token_seq_index.shape != token_context_lens.shape or token_seq_index.dim() != 1:
        raise ValueError("build_tile_table: token_seq_index and token_context_lens must be 1-D "
                         f"of equal length, got {tuple(token_seq_index.shape)} and "
                         f"{tuple(token_context_lens.shape)}")
    seq = token_seq_index.to("cpu", torch.int64)
    ctx = token_context_lens.to("cpu", torch.int64)
    num_tokens = seq.numel()
    index = torch.arange(num_tokens)
    new_run = torch.ones(num_tokens, dtype=torch.bool)
    new_run[1:] = (seq[1:] != seq[:-1]) | (ctx[1:] != ctx[:-1] + 1)
    run_start = torch.cummax(torch.where(new_run, index, 0), 0).values
    starts = torch.nonzero(new_run | ((index - run_start) % block_q == 0)).squeeze(1)
    lengths = torch.diff(starts, append=torch.tensor([num_tokens]))
    single = lengths == 1
    table = torch.stack([starts, lengths]).to(torch.int32)
    return TileTable(table[:, single].contiguous(), table[:, ~single].contiguous(), block_q)


def checked_tile_table(token_seq_index: torch.Tensor, token_context_lens: torch.Tensor,
                       block_q: int, num_rows: int, max_context: int) -> TileTable:
    """`build_tile_table`, after checking the tokens' rows (< num_rows) and contexts
    (1..max_context): out-of-range ones would read outside the block table."""
    seq, ctx = token_seq_index.cpu(), token_context_lens.cpu()
    if seq.numel() and (int(seq.min()) < 0 or int(seq.max()) >= num_rows
                        or int(ctx.min()) < 1 or int(ctx.max()) > max_context):
        raise ValueError(f"paged_attention: token_seq_index must be in [0, {num_rows}) and "
                         f"token_context_lens in [1, max_context = {max_context}]")
    return build_tile_table(seq, ctx, block_q)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                    token_seq_index: torch.Tensor, token_context_lens: torch.Tensor,
                    max_context: int, num_heads: int, scale: float, *, window: int = 0,
                    softcap: float = 0.0, tiles: TileTable | None = None) -> torch.Tensor:
    """q [T, H*d] -> out [T, H*d] (q's dtype): softmax(cap(scale q K^T)) V where token t with
    n = token_context_lens[t] attends to the cached positions max(0, n - window)..n-1 (all of
    0..n-1 for window 0) of block-table row token_seq_index[t]; cap(s) = softcap tanh(s /
    softcap), or s for softcap 0. `max_context` bounds every n (<= Nb * block_size). `tiles`:
    this step's `build_tile_table(token_seq_index, token_context_lens,
    prefill_tile_tokens(...))` on the device (the caller builds it once per step, from host
    tensors), or None to build and check it here (one device-to-host copy)."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError("paged_attention: kv_cache must be [2, num_kv_heads, num_blocks, "
                         f"block_size, head_dim], got {tuple(kv_cache.shape)}")
    _, num_kv_heads, _, block_size, head_dim = kv_cache.shape
    if kv_cache.dtype not in _DTYPES or q.dtype != kv_cache.dtype:
        raise ValueError(f"paged_attention: q ({q.dtype}) and kv_cache ({kv_cache.dtype}) must "
                         "share one dtype of float32, bfloat16, float16")
    if num_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"paged_attention: num_heads ({num_heads}) must be a positive multiple "
                         f"of num_kv_heads ({num_kv_heads})")
    if block_size & (block_size - 1) or not 1 <= head_dim <= _HEAD_DIM_LIMIT:
        raise ValueError(f"paged_attention: block_size ({block_size}) must be a power of two "
                         f"and head_dim ({head_dim}) at most {_HEAD_DIM_LIMIT}")
    if kv_cache.stride(4) != 1:
        raise ValueError("paged_attention: kv_cache rows (head_dim) must be contiguous")
    if q.dim() != 2 or q.shape[1] != num_heads * head_dim or q.stride(1) != 1:
        raise ValueError(f"paged_attention: q must be [T, {num_heads * head_dim}] with "
                         f"contiguous rows, got {tuple(q.shape)} strides {q.stride()}")
    num_tokens = q.shape[0]
    if token_seq_index.shape != (num_tokens,) or token_context_lens.shape != (num_tokens,):
        raise ValueError(f"paged_attention: token_seq_index {tuple(token_seq_index.shape)} and "
                         f"token_context_lens {tuple(token_context_lens.shape)} must be "
                         f"[{num_tokens}]")
    if block_tables.dim() != 2 or block_tables.dtype not in (torch.int64, torch.int32) \
            or block_tables.stride(1) != 1:
        raise ValueError("paged_attention: block_tables must be [B, Nb] int64 or int32 with "
                         "contiguous rows")
    if not 0 < max_context <= block_tables.shape[1] * block_size:
        raise ValueError(f"paged_attention: max_context ({max_context}) must be in "
                         f"[1, Nb * block_size = {block_tables.shape[1] * block_size}]")
    if window < 0 or softcap < 0 or not math.isfinite(softcap):
        raise ValueError(f"paged_attention: window ({window}) and softcap ({softcap}) must be "
                         ">= 0 (0 = no window / no soft-capping)")
    tensors = (q, kv_cache, block_tables, token_seq_index, token_context_lens)
    if any(t.device != q.device for t in tensors):
        raise ValueError("paged_attention: all tensors must be on one device, got "
                         f"{sorted({str(t.device) for t in tensors})}")
    if triton is None or not (q.device.type == "cuda" or _INTERPRET):
        raise ValueError(f"paged_attention: needs triton and CUDA tensors (got {q.device}; CPU "
                         "tensors only under TRITON_INTERPRET=1)")
    out = torch.empty((num_tokens, num_heads * head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    if tiles is None:
        tiles = checked_tile_table(token_seq_index, token_context_lens,
                                   prefill_tile_tokens(num_heads, num_kv_heads, head_dim),
                                   block_tables.shape[0], max_context).to(q.device)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    head_pad = max(16, _next_pow2(head_dim))
    group_pad = _next_pow2(group)
    common = dict(GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_PAD=head_pad,
                  BLOCK_SIZE=block_size, USE_WINDOW=window > 0, USE_SOFTCAP=softcap > 0,
                  PRECISION="ieee" if q.dtype == torch.float32 else None,
                  DOT_F32=_INTERPRET and q.dtype == torch.bfloat16)
    for table, block_q in ((tiles.decode, 1), (tiles.prefill, tiles.block_q)):
        num_tiles = table.shape[1]
        if num_tiles == 0:
            continue
        block_m = max(16, _next_pow2(block_q * group_pad))
        block_n = max(block_size, 64 if head_pad <= 128 else 32)
        _paged_attention_kernel[(num_tiles, num_kv_heads)](
            out, q, k_cache, v_cache, block_tables, token_context_lens, token_seq_index,
            table[0], table[1], out.stride(0), q.stride(0), block_tables.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            float(scale), float(softcap), int(window),
            BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=4 if head_pad * block_m <= 64 * 128 else 8, **common)
    return out


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
