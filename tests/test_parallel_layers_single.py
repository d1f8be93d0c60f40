"""Tensor-parallel layers without processes: tp=1 numerics and the tp>1 sharding math.

At tp=1 (single-member groups, no collectives) every parallel layer loaded through its
`weight_loader`s computes exactly `F.linear` / `F.embedding` of the full weights, with QKV loaded
from separate q/k/v tensors and from a fused [q; k; v] tensor. For tp in (2, 4), one layer per
"rank" is built on a fake group (no process group; forward is never run with a real collective)
and loaded from the same full weights; the tests prove that the shards partition the full tensor
exactly as Megatron prescribes: column shards stack to the full weight, row shards concatenate
along the input dimension, merged gate|up shards hold [gate_i; up_i], QKV shards hold the right
query heads and the KV heads those queries use (replicated when tp > num_kv_heads), and the
vocabulary is padded to a multiple of tp with zero rows. A group whose all_reduce is the identity
lets the per-rank partial results of the row-parallel and embedding forwards be summed by hand.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vbatch.parallel.comm import GroupCoordinator
from vbatch.parallel.embedding import ParallelLMHead, VocabParallelEmbedding, pad_vocab_size
from vbatch.parallel.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    divide,
)

CPU = torch.device("cpu")
F32 = torch.float32


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


def fake_group(tp: int, rank: int) -> GroupCoordinator:
    return GroupCoordinator(ranks=list(range(tp)), rank_in_group=rank, device_group=None)


class PartialGroup(GroupCoordinator):
    """A fake multi-rank group whose all_reduce returns this rank's partial (summed by the test)."""

    def all_reduce(self, x):
        return x


def load(param, loaded, shard_id=None):
    param.weight_loader(param, loaded, shard_id)


# ---- tp = 1: equal to the plain functional ops --------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gather_output", [True, False])
def test_column_parallel_tp1(bias, gather_output):
    w, b, x = rand(24, 16, seed=1), rand(24, seed=2), rand(5, 16, seed=3)
    layer = ColumnParallelLinear(16, 24, bias=bias, tp_group=GroupCoordinator.single(),
                                 dtype=F32, device=CPU, gather_output=gather_output)
    load(layer.weight, w)
    if bias:
        load(layer.bias, b)
    torch.testing.assert_close(layer(x), F.linear(x, w, b if bias else None), rtol=0, atol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_merged_column_parallel_tp1(bias):
    gate, up, x = rand(12, 16, seed=1), rand(20, 16, seed=2), rand(3, 7, 16, seed=3)
    gate_b, up_b = rand(12, seed=4), rand(20, seed=5)
    layer = MergedColumnParallelLinear(16, [12, 20], bias=bias, tp_group=GroupCoordinator.single(),
                                       dtype=F32, device=CPU)
    load(layer.weight, up, 1)                         # load order must not matter
    load(layer.weight, gate, 0)
    if bias:
        load(layer.bias, gate_b, 0)
        load(layer.bias, up_b, 1)
    expected = F.linear(x, torch.cat([gate, up]), torch.cat([gate_b, up_b]) if bias else None)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError):
        load(layer.weight, gate)                      # shard_id is required


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("fused", [False, True])
def test_qkv_parallel_tp1(num_heads, num_kv_heads, fused):
    head, hidden = 8, 32
    q = rand(num_heads * head, hidden, seed=1)
    k = rand(num_kv_heads * head, hidden, seed=2)
    v = rand(num_kv_heads * head, hidden, seed=3)
    qb, kb, vb = rand(q.shape[0], seed=4), rand(k.shape[0], seed=5), rand(v.shape[0], seed=6)
    x = rand(9, hidden, seed=7)
    layer = QKVParallelLinear(hidden, head, num_heads, num_kv_heads, bias=True,
                              tp_group=GroupCoordinator.single(), dtype=F32, device=CPU)
    assert layer.weight.shape == (q.shape[0] + 2 * k.shape[0], hidden)
    if fused:
        load(layer.weight, torch.cat([q, k, v]))
        load(layer.bias, torch.cat([qb, kb, vb]))
    else:
        for sid, w, b in (("v", v, vb), ("q", q, qb), ("k", k, kb)):
            load(layer.weight, w, sid)
            load(layer.bias, b, sid)
    expected = F.linear(x, torch.cat([q, k, v]), torch.cat([qb, kb, vb]))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_parallel_tp1(bias, input_is_parallel):
    w, b, x = rand(16, 24, seed=1), rand(16, seed=2), rand(2, 5, 24, seed=3)
    layer = RowParallelLinear(24, 16, bias=bias, tp_group=GroupCoordinator.single(), dtype=F32,
                              device=CPU, input_is_parallel=input_is_parallel)
    load(layer.weight, w)
    if bias:
        load(layer.bias, b)
    torch.testing.assert_close(layer(x), F.linear(x, w, b if bias else None), rtol=0, atol=0)


def test_vocab_parallel_embedding_tp1():
    table = rand(37, 8, seed=1)
    ids = torch.tensor([[0, 5, 36], [12, 12, 1]])
    emb = VocabParallelEmbedding(37, 8, tp_group=GroupCoordinator.single(), dtype=F32, device=CPU)
    assert emb.num_embeddings_padded == 37
    load(emb.weight, table)
    torch.testing.assert_close(emb(ids), F.embedding(ids, table), rtol=0, atol=0)
    with pytest.raises(ValueError, match="vocab_size"):
        load(emb.weight, rand(36, 8))


@pytest.mark.parametrize("tied", [False, True])
def test_parallel_lm_head_tp1(tied):
    table, h = rand(37, 8, seed=1), rand(4, 8, seed=2)
    single = GroupCoordinator.single()
    emb = VocabParallelEmbedding(37, 8, tp_group=single, dtype=F32, device=CPU)
    load(emb.weight, table)
    head = ParallelLMHead(37, 8, tp_group=single, dtype=F32, device=CPU,
                          tie_to=emb if tied else None)
    if tied:
        assert head.weight is emb.weight
    else:
        load(head.weight, table)
    logits = head.compute_logits(h)
    assert logits.shape == (4, 37)
    torch.testing.assert_close(logits, F.linear(h, table), rtol=0, atol=0)


def test_shape_mismatch_is_a_clear_error():
    layer = ColumnParallelLinear(16, 24, bias=False, tp_group=GroupCoordinator.single(),
                                 dtype=F32, device=CPU)
    with pytest.raises(ValueError, match="shape"):
        load(layer.weight, rand(24, 15))


def test_divide():
    assert divide(12, 4, "x") == 3
    with pytest.raises(ValueError, match="heads"):
        divide(6, 4, "number of heads")


# ---- tp > 1: sharding math, one layer per fake rank ---------------------------------------------

TPS = [2, 4]


@pytest.mark.parametrize("tp", TPS)
def test_column_parallel_shards(tp):
    w, b = rand(24, 16, seed=1), rand(24, seed=2)
    shards_w, shards_b = [], []
    for r in range(tp):
        layer = ColumnParallelLinear(16, 24, bias=True, tp_group=fake_group(tp, r), dtype=F32,
                                     device=CPU)
        assert layer.weight.shape == (24 // tp, 16)
        load(layer.weight, w)
        load(layer.bias, b)
        shards_w.append(layer.weight.data.clone())
        shards_b.append(layer.bias.data.clone())
    assert torch.equal(torch.cat(shards_w), w)
    assert torch.equal(torch.cat(shards_b), b)
    # Y = [X A_1 ... X A_p]: the gathered outputs equal the full product
    x = rand(3, 16, seed=3)
    torch.testing.assert_close(torch.cat([F.linear(x, sw, sb) for sw, sb in
                                          zip(shards_w, shards_b)], -1), F.linear(x, w, b))


@pytest.mark.parametrize("tp", TPS)
def test_merged_column_parallel_shards(tp):
    gate, up = rand(8, 6, seed=1), rand(16, 6, seed=2)
    for r in range(tp):
        layer = MergedColumnParallelLinear(6, [8, 16], bias=False, tp_group=fake_group(tp, r),
                                           dtype=F32, device=CPU)
        load(layer.weight, gate, 0)
        load(layer.weight, up, 1)
        expected = torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]])
        assert torch.equal(layer.weight.data, expected)
    with pytest.raises(ValueError, match="merged"):
        MergedColumnParallelLinear(6, [8, 6], bias=False, tp_group=fake_group(4, 0), dtype=F32,
                                   device=CPU)


def _qkv_rank_parts(tp, r, num_heads, num_kv_heads, head, hidden, q, k, v, fused):
    layer = QKVParallelLinear(hidden, head, num_heads, num_kv_heads, bias=True,
                              tp_group=fake_group(tp, r), dtype=F32, device=CPU)
    if fused:
        load(layer.weight, torch.cat([q, k, v]))
        load(layer.bias, torch.cat([q[:, 0], k[:, 0], v[:, 0]]))
    else:
        for sid, w in (("q", q), ("k", k), ("v", v)):
            load(layer.weight, w, sid)
            load(layer.bias, w[:, 0], sid)
    w = layer.weight.data
    qs, kvs = layer.q_size, layer.kv_size
    assert w.shape[0] == qs + 2 * kvs
    assert torch.equal(layer.bias.data, w[:, 0])       # bias follows the same row layout
    return layer, w[:qs], w[qs:qs + kvs], w[qs + kvs:]


def _heads(t: torch.Tensor, head: int, idx) -> torch.Tensor:
    return torch.cat([t[h * head:(h + 1) * head] for h in idx])


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("num_heads, num_kv_heads", [(8, 8), (8, 4), (8, 2), (8, 1), (4, 4)])
@pytest.mark.parametrize("fused", [False, True])
def test_qkv_shards_select_heads(tp, num_heads, num_kv_heads, fused):
    if num_heads % tp:
        pytest.skip("heads not divisible")
    head, hidden = 4, 8
    q = rand(num_heads * head, hidden, seed=1)
    k = rand(num_kv_heads * head, hidden, seed=2)
    v = rand(num_kv_heads * head, hidden, seed=3)
    group = num_heads // num_kv_heads
    q_parts = []
    for r in range(tp):
        layer, qr, kr, vr = _qkv_rank_parts(tp, r, num_heads, num_kv_heads, head, hidden,
                                            q, k, v, fused)
        q_heads = list(range(r * num_heads // tp, (r + 1) * num_heads // tp))
        if tp >= num_kv_heads:
            kv_heads = [r // (tp // num_kv_heads)]
            assert layer.num_kv_head_replicas == tp // num_kv_heads
        else:
            per = num_kv_heads // tp
            kv_heads = list(range(r * per, (r + 1) * per))
        assert layer.num_heads == len(q_heads) and layer.num_kv_heads == len(kv_heads)
        assert torch.equal(qr, _heads(q, head, q_heads))
        assert torch.equal(kr, _heads(k, head, kv_heads))
        assert torch.equal(vr, _heads(v, head, kv_heads))
        # GQA consistency: the KV heads on this rank are exactly those its query heads use
        assert sorted({h // group for h in q_heads}) == kv_heads
        q_parts.append(qr)
    assert torch.equal(torch.cat(q_parts), q)


def test_qkv_gqa_replication_tp4_two_kv_heads():
    tp, num_heads, num_kv_heads, head, hidden = 4, 8, 2, 4, 8
    q = rand(num_heads * head, hidden, seed=1)
    k = rand(num_kv_heads * head, hidden, seed=2)
    v = rand(num_kv_heads * head, hidden, seed=3)
    k_heads = k.view(num_kv_heads, head, hidden)
    v_heads = v.view(num_kv_heads, head, hidden)
    for r, kv_head in zip(range(tp), [0, 0, 1, 1]):
        for fused in (False, True):
            _, _, kr, vr = _qkv_rank_parts(tp, r, num_heads, num_kv_heads, head, hidden,
                                           q, k, v, fused)
            assert torch.equal(kr, k_heads[kv_head]) and torch.equal(vr, v_heads[kv_head])


def test_qkv_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="attention heads"):
        QKVParallelLinear(8, 4, 6, 2, bias=False, tp_group=fake_group(4, 0), dtype=F32,
                          device=CPU)
    with pytest.raises(ValueError):
        QKVParallelLinear(8, 4, 12, 3, bias=False, tp_group=fake_group(4, 0), dtype=F32,
                          device=CPU)


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("bias", [True, False])
def test_row_parallel_shards(tp, bias):
    w, b, x = rand(16, 24, seed=1), rand(16, seed=2), rand(3, 24, seed=3)
    shards, partials = [], []
    for r in range(tp):
        group = PartialGroup(ranks=list(range(tp)), rank_in_group=r)
        layer = RowParallelLinear(24, 16, bias=bias, tp_group=group, dtype=F32, device=CPU,
                                  input_is_parallel=False, reduce_results=False)
        assert layer.weight.shape == (16, 24 // tp)
        load(layer.weight, w)
        if bias:
            load(layer.bias, b)
            assert torch.equal(layer.bias.data, b)     # replicated on every rank
        shards.append(layer.weight.data.clone())
        partials.append(layer(x))                     # this rank's X_i A_i (+ b on rank 0)
    assert torch.equal(torch.cat(shards, dim=1), w)
    torch.testing.assert_close(sum(partials), F.linear(x, w, b if bias else None))


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("vocab", [37, 40, 3])
def test_vocab_parallel_embedding_shards(tp, vocab):
    dim = 6
    table = rand(vocab, dim, seed=1)
    padded = pad_vocab_size(vocab, tp)
    assert padded % tp == 0 and vocab <= padded < vocab + tp
    ids = torch.arange(vocab).roll(3).view(1, -1)
    shards, partials = [], []
    for r in range(tp):
        emb = VocabParallelEmbedding(vocab, dim, tp_group=PartialGroup(list(range(tp)), r),
                                     dtype=F32, device=CPU)
        emb.weight.data.fill_(float("nan"))           # padding must be zeroed by the loader
        load(emb.weight, table)
        assert emb.num_embeddings_padded == padded
        assert (emb.vocab_start_index, emb.vocab_end_index) == (r * padded // tp,
                                                                (r + 1) * padded // tp)
        shards.append(emb.weight.data.clone())
        partials.append(emb(ids))                     # rows it owns, zeros elsewhere
    full = torch.cat(shards)
    assert full.shape == (padded, dim)
    assert torch.equal(full[:vocab], table)
    assert torch.equal(full[vocab:], torch.zeros(padded - vocab, dim))
    torch.testing.assert_close(sum(partials), F.embedding(ids, table), rtol=0, atol=0)


@pytest.mark.parametrize("tp", TPS)
def test_lm_head_shards_and_padded_logits(tp):
    vocab, dim = 37, 6
    table, h = rand(vocab, dim, seed=1), rand(2, dim, seed=2)
    per_rank = []
    for r in range(tp):
        head = ParallelLMHead(vocab, dim, tp_group=fake_group(tp, r), dtype=F32, device=CPU)
        load(head.weight, table)
        per_rank.append(F.linear(h, head.weight))      # what each rank computes before gather
    gathered = torch.cat(per_rank, dim=-1)
    assert gathered.shape[-1] == pad_vocab_size(vocab, tp)
    assert torch.equal(gathered[:, vocab:], torch.zeros(2, gathered.shape[-1] - vocab))
    torch.testing.assert_close(gathered[:, :vocab], F.linear(h, table))
