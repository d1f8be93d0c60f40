"""Paged attention equals dense causal attention, through the engine's own metadata.

`ModelRunner._prepare` builds the `AttentionMetadata` of each step from scheduled sequences (as
the engine sends them), and `PagedAttention` writes the step's keys/values into a paged cache and
attends over it. For random q/k/v with GQA, shuffled non-contiguous block tables, ragged prefill
lengths, decode steps, and chunks whose prefix is already cached (start_position > 0 with
query_len > 1, mixed with single-token rows), every output equals an independent per-sequence
dense causal attention in float64 (KV heads repeat-interleaved to the query heads). Every
block but the null block 0 starts out holding large finite garbage (what a freed block keeps
from its previous owner), so any key read past a sequence's context that the mask failed to
hide would change the result. Also checks the metadata itself (positions, which logits are
sampled) and the zero-filled cache allocation.

Per-layer sliding windows and attention-logit soft-capping: the same steps (prompts longer than
the window, chunked prefill, decode across block boundaries) on both paths, in float32 and
bfloat16, against the dense reference with Hugging Face's window (query p sees keys k with
p - k < W) and Gemma 2's cap (c * tanh(s / c) before the mask); each such world also checks
that the option changed some output, so a path that ignored it would fail.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from vbatch.engine.block_manager import num_blocks_for
from vbatch.engine.layers.attention import AttentionMetadata, PagedAttention, allocate_kv_cache
from vbatch.engine.model_runner import ModelRunner
from vbatch.engine.sequence import ScheduledSequence

CPU = torch.device("cpu")


def native_kernels():
    from vbatch.engine.kernels.cpu_kernels import cpu_kernels
    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("native CPU kernels unavailable (no C compiler?)")
    return kernels


def scheduled(seq_id: int, num_new: int, start: int, block_table: list[int]) -> ScheduledSequence:
    return ScheduledSequence(seq_id=seq_id, token_ids=[7] * num_new, start_position=start,
                             block_table=block_table, temperature=0.0, top_p=1.0, top_k=0,
                             min_p=0.0, seed=0, row_key=str(seq_id), output_index=0)


def dense_reference(q, k, v, scale, window=None, softcap=None):
    """Causal attention over one whole sequence: q [n, H, d], k/v [n, Hkv, d] -> [n, H, d];
    with `window`, query i sees keys j with i - window < j <= i; with `softcap` c, scores s
    become c * tanh(s / c) before masking."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).double()
    v = v.repeat_interleave(group, dim=1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    n = q.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    if window is not None:
        i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
        causal &= i - j < window
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


class World:
    """A paged cache, one attention layer, and the full q/k/v of every sequence."""

    def __init__(self, *, num_heads=4, num_kv_heads=2, head_dim=8, block_size=4,
                 num_blocks=64, seed=0, native=False, dtype=torch.float32, tolerance=1e-5,
                 sliding_window=None, logit_softcap=None):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.h, self.hkv, self.d, self.bs = num_heads, num_kv_heads, head_dim, block_size
        self.scale = 1 / math.sqrt(head_dim)
        self.dtype, self.tolerance = dtype, tolerance
        self.window, self.softcap = sliding_window, logit_softcap
        self.option_changed_output = False
        self.attn = PagedAttention(num_heads, num_kv_heads, head_dim, self.scale,
                                   sliding_window=sliding_window, logit_softcap=logit_softcap)
        cache = allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, CPU)
        assert cache.shape == (2, num_kv_heads, num_blocks, block_size, head_dim)
        # stale values of previous owners in every block except the null block 0
        cache[:, :, 1:] = torch.randn(cache[:, :, 1:].shape, generator=self.gen) * 100
        self.attn.bind_cache(cache)
        if native:      # the C kernels for cache writes and decode (needs head_dim % 16 == 0)
            self.attn.kernels = native_kernels()
        else:
            self.attn.kernels = None
        self.runner = ModelRunner(None, block_size=block_size, device=CPU, dtype=torch.float32)
        self.free = list(range(1, num_blocks))
        self.rng.shuffle(self.free)                    # non-contiguous, out-of-order tables
        self.q, self.k, self.v, self.tables = {}, {}, {}, {}

    def new_seq(self, seq_id: int, total_len: int) -> None:
        # in the world's dtype: the reference sees the same (rounded) inputs as the layer
        for store, heads in ((self.q, self.h), (self.k, self.hkv), (self.v, self.hkv)):
            store[seq_id] = torch.randn(total_len, heads, self.d, generator=self.gen).to(
                self.dtype)
        self.tables[seq_id] = []

    def step(self, chunks: list[tuple[int, int, int]]) -> None:
        """Run one step of (seq_id, start_position, num_new) and check every output row."""
        for seq_id, start, num_new in chunks:
            table = self.tables[seq_id]
            while len(table) < num_blocks_for(start + num_new, self.bs):
                table.append(self.free.pop())
        seqs = [scheduled(i, n, s, list(self.tables[i])) for i, s, n in chunks]
        _, positions, meta, logits_index = self.runner._prepare(seqs)
        assert isinstance(meta, AttentionMetadata)
        expected_positions = [p for _, s, n in chunks for p in range(s, s + n)]
        assert positions.tolist() == expected_positions
        q = torch.cat([self.q[i][s:s + n] for i, s, n in chunks]).reshape(-1, self.h * self.d)
        k = torch.cat([self.k[i][s:s + n] for i, s, n in chunks]).reshape(-1, self.hkv * self.d)
        v = torch.cat([self.v[i][s:s + n] for i, s, n in chunks]).reshape(-1, self.hkv * self.d)
        out = self.attn(q, k, v, meta)
        assert out.shape == (len(expected_positions), self.h * self.d) and out.dtype == q.dtype
        assert not out.isnan().any()
        row = 0
        for seq_id, start, num_new in chunks:
            ctx = start + num_new
            q_seq, k_seq, v_seq = self.q[seq_id][:ctx], self.k[seq_id][:ctx], self.v[seq_id][:ctx]
            ref = dense_reference(q_seq, k_seq, v_seq, self.scale, self.window,
                                  self.softcap)[start:ctx]
            got = out[row:row + num_new].view(num_new, self.h, self.d).double()
            torch.testing.assert_close(got, ref, rtol=self.tolerance, atol=self.tolerance)
            if self.window is not None or self.softcap is not None:
                plain = dense_reference(q_seq, k_seq, v_seq, self.scale)[start:ctx]
                self.option_changed_output |= (plain - ref).abs().max().item() > 0.1
            row += num_new
        # the sampled logits come from each sequence's last new token
        ends = torch.tensor([n for _, _, n in chunks]).cumsum(0) - 1
        assert logits_index.tolist() == ends.tolist()


@pytest.mark.parametrize("native", [False, True])
def test_ragged_prefill_then_decode_gqa_shuffled_blocks(native):
    world = World(num_heads=8, num_kv_heads=2, head_dim=16 if native else 8, block_size=4,
                  native=native)
    lengths = {0: 5, 1: 1, 2: 11, 3: 8, 4: 4}
    for seq_id, n in lengths.items():
        world.new_seq(seq_id, n + 6)
    world.step([(i, 0, n) for i, n in lengths.items()])
    for t in range(6):                                 # decode steps, across block boundaries
        world.step([(i, n + t, 1) for i, n in lengths.items()])
    tables = list(world.tables.values())
    assert any(t != sorted(t) for t in tables)         # out of order within a sequence
    assert any(b - a != 1 for t in tables for a, b in zip(t, t[1:]))   # and not contiguous


@pytest.mark.parametrize("native", [False, True])
def test_prefix_in_cache_with_multi_token_query(native):
    world = World(num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, seed=1, native=native)
    world.new_seq(0, 30)
    world.new_seq(1, 30)
    world.new_seq(2, 30)
    world.step([(0, 0, 6), (1, 0, 3)])                 # prefixes cached
    # chunks with start_position > 0 and query_len > 1, next to a fresh prefill and a decode row
    world.step([(0, 6, 5), (1, 3, 9), (2, 0, 7)])
    world.step([(0, 11, 1), (1, 12, 1), (2, 7, 4)])
    world.step([(2, 11, 1), (0, 12, 3)])


@pytest.mark.parametrize("native", [False, True])
def test_decode_only_batch_single_query_path(native):
    world = World(num_heads=6, num_kv_heads=3, head_dim=32 if native else 4, block_size=2, seed=2,
                  native=native)
    for i, n in enumerate([1, 2, 3, 7]):
        world.new_seq(i, n + 4)
        world.step([(i, 0, n)])                        # one prefill each, separately
    for t in range(4):
        world.step([(i, n + t, 1) for i, n in enumerate([1, 2, 3, 7])])


def test_prefill_of_single_token_prompts_uses_the_decode_path():
    world = World(num_heads=4, num_kv_heads=1, head_dim=8, block_size=4, seed=3)
    for i in range(3):
        world.new_seq(i, 3)
    world.step([(0, 0, 1), (1, 0, 1), (2, 0, 1)])
    world.step([(0, 1, 2), (1, 1, 1), (2, 1, 2)])


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_random_steps(seed, native):
    rng = random.Random(seed)
    num_kv = rng.choice([1, 2, 4])
    world = World(num_heads=4, num_kv_heads=num_kv, head_dim=16 if native else 8,
                  block_size=rng.choice([1, 3, 4, 16]), num_blocks=400, seed=seed, native=native)
    done = {}
    for seq_id in range(6):
        world.new_seq(seq_id, 40)
        done[seq_id] = 0
    for _ in range(8):
        chosen = rng.sample(sorted(done), rng.randint(1, 6))
        chunks = []
        for seq_id in chosen:
            n = rng.choice([1, 1, 2, 5]) if done[seq_id] < 35 else 0
            if n and done[seq_id] + n <= 40:
                chunks.append((seq_id, done[seq_id], n))
                done[seq_id] += n
        if chunks:
            world.step(chunks)


WINDOW_CASES = [(5, None), (None, 1.5), (5, 1.5)]     # (sliding_window, logit_softcap)


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("options", WINDOW_CASES, ids=["window", "softcap", "both"])
def test_sliding_window_and_softcap_match_dense_reference(options, dtype, native):
    """Window 5 over blocks of 4 (windows start mid-block, whole blocks fall out of it),
    prompts up to 31 tokens, a chunked prefill after a cached prefix, and decode steps."""
    window, softcap = options
    # bf16: the PyTorch path rounds q k^T to bf16 (as Hugging Face's eager attention does)
    tolerance = 1e-5 if dtype == torch.float32 else (8e-3 if native else 3e-2)
    world = World(num_heads=8, num_kv_heads=2, head_dim=16, block_size=4, seed=7,
                  native=native, dtype=dtype, tolerance=tolerance, sliding_window=window,
                  logit_softcap=softcap)
    done = {0: 0, 1: 0, 2: 0, 3: 0, 4: 0}
    for seq_id in done:
        world.new_seq(seq_id, 40)

    def step(*new: tuple[int, int]) -> None:
        world.step([(seq_id, done[seq_id], n) for seq_id, n in new])
        for seq_id, n in new:
            done[seq_id] += n

    step((0, 13), (1, 1), (2, 31), (3, 6))       # prompts, most longer than the window
    step((4, 4), (0, 1), (2, 1))                 # a prompt's first chunk, next to decodes
    step((4, 5), (1, 1), (3, 1))                 # its second chunk, after a cached prefix
    for _ in range(5):                           # decode steps, across block boundaries
        step(*((seq_id, 1) for seq_id in done))
    assert world.option_changed_output


@pytest.mark.parametrize("kwargs", [
    {"sliding_window": 0}, {"sliding_window": -4}, {"sliding_window": 4.0},
    {"sliding_window": True}, {"logit_softcap": 0.0}, {"logit_softcap": -50.0},
    {"logit_softcap": float("nan")}, {"logit_softcap": float("inf")}, {"logit_softcap": "50"},
])
def test_rejects_invalid_window_and_softcap(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be a positive"):
        PagedAttention(4, 2, 16, 0.25, **kwargs)


def test_window_and_softcap_defaults_and_accepted_values():
    plain = PagedAttention(4, 2, 16, 0.25)
    assert plain.sliding_window is None and plain.logit_softcap is None
    layer = PagedAttention(4, 2, 16, 0.25, sliding_window=4096, logit_softcap=50)
    assert layer.sliding_window == 4096 and layer.logit_softcap == 50.0
    assert isinstance(layer.logit_softcap, float)


def test_no_head_mixing_mha_equals_gqa_with_repeated_kv():
    """GQA with k/v duplicated per query head equals MHA on the duplicated heads."""
    world_gqa = World(num_heads=4, num_kv_heads=2, head_dim=8, seed=5)
    world_mha = World(num_heads=4, num_kv_heads=4, head_dim=8, seed=5)
    world_gqa.new_seq(0, 6)
    world_mha.new_seq(0, 6)
    world_mha.q[0] = world_gqa.q[0]
    world_mha.k[0] = world_gqa.k[0].repeat_interleave(2, dim=1)
    world_mha.v[0] = world_gqa.v[0].repeat_interleave(2, dim=1)
    world_gqa.step([(0, 0, 6)])
    world_mha.step([(0, 0, 6)])


def test_hand_built_metadata_decode():
    """AttentionMetadata built by hand (no ModelRunner): one decode token over 3 cached keys."""
    bs, hkv, d = 2, 1, 4
    attn = PagedAttention(2, hkv, d, scale=0.5)
    cache = allocate_kv_cache(8, bs, hkv, d, torch.float32, CPU)
    attn.bind_cache(cache)
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(4, hkv, d, generator=gen), torch.randn(4, hkv, d, generator=gen)
    # positions 0,1 -> block 5; positions 2,3 -> block 2; position 3 is the new token
    cache[0, :, 5], cache[1, :, 5] = keys[:2].transpose(0, 1), values[:2].transpose(0, 1)
    cache[0, :, 2, 0], cache[1, :, 2, 0] = keys[2], values[2]
    cache[0, :, 2, 1] = cache[1, :, 2, 1] = 99.0       # stale: must be overwritten
    cache[:, :, 3] = 1e4                               # padding block of the table: masked
    q = torch.randn(1, 2 * d, generator=gen)
    meta = AttentionMetadata.build(slot_mapping=torch.tensor([2 * bs + 1]),
                                   block_tables=torch.tensor([[5, 2, 3]]),
                                   token_seq_index=torch.tensor([0]),
                                   token_context_lens=torch.tensor([4]), query_lens=[1],
                                   context_lens=[4], block_size=bs, rows_per_chunk=128)
    out = attn(q, keys[3].reshape(1, -1), values[3].reshape(1, -1), meta).view(2, d)
    assert torch.equal(cache[0, :, 2, 1], keys[3]) and torch.equal(cache[1, :, 2, 1], values[3])
    scores = torch.einsum("hd,kd->hk", q.view(2, d), keys[:, 0]) * 0.5
    expected = scores.softmax(-1) @ values[:, 0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_allocate_kv_cache_is_zeroed(dtype):
    cache = allocate_kv_cache(5, 4, 2, 8, dtype, CPU)
    assert cache.shape == (2, 2, 5, 4, 8) and cache.dtype == dtype
    assert not cache.any()
    cache[0, :, 1, 2] = 1.5                            # writable, and views write through
    cache[1].view(2, -1, 8)[:, 3] = 2.0
    assert cache[0, :, 1, 2].float().eq(1.5).all() and cache[1, :, 0, 3].float().eq(2.0).all()


def test_half_precision_decode_path_matches_float32_reference():
    """bf16 decode (bmm + float32 softmax path) stays within bf16 rounding of float32 SDPA."""
    import torch.nn.functional as F

    from vbatch.engine.layers.attention import _matmul_attention

    gen = torch.Generator().manual_seed(0)
    rows, lk, group, d = 12, 40, 3, 16
    q = torch.randn(rows, 1, group, d, generator=gen)
    keys = torch.randn(rows, 1, lk, d, generator=gen)
    values = torch.randn(rows, 1, lk, d, generator=gen)
    lengths = torch.randint(1, lk + 1, (rows,), generator=gen)
    mask = (torch.arange(lk).view(1, -1) < lengths.view(-1, 1)).view(rows, 1, 1, lk)
    mask = mask.expand(rows, 1, group, lk)
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.25)
    got = _matmul_attention(q.bfloat16(), keys.bfloat16(), values.bfloat16(), mask, 0.25)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=3e-2)
