"""Tensor-parallel layers with real torch.distributed process groups (gloo on CPU).

Proves, for world sizes 2 and 4: every Megatron layer (column-parallel with gathered output,
merged gate/up, QKV with GQA incl. replicated KV heads, row-parallel with one all-reduce and
the bias added once, vocab-parallel embedding, LM head with padded vocabulary) computes the same
result as the unsharded `F.linear` / `F.embedding` built from the same full weights; and that
`init_parallel_state` builds TP/PP groups as `arange(world).reshape(pp, tp)`.
"""
from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_layers(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from vbatch.parallel.embedding import ParallelLMHead, VocabParallelEmbedding
    from vbatch.parallel.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )
    from vbatch.parallel.state import init_parallel_state

    torch.set_num_threads(1)
    ps = init_parallel_state(world_rank=rank, tp_size=world, pp_size=1,
                             init_method=f"tcp://127.0.0.1:{port}", device=torch.device("cpu"),
                             timeout_s=60)
    try:
        gen = torch.Generator().manual_seed(0)          # identical full weights on every rank
        hidden, head_dim, num_heads, num_kv_heads, vocab = 16, 4, 4, 2, 37
        x = torch.randn(5, hidden, generator=gen)
        common = dict(tp_group=ps.tp, dtype=torch.float32, device=torch.device("cpu"))

        w, b = torch.randn(24, hidden, generator=gen), torch.randn(24, generator=gen)
        col = ColumnParallelLinear(hidden, 24, bias=True, gather_output=True, **common)
        col.weight_loader(col.weight, w)
        col.weight_loader(col.bias, b)
        torch.testing.assert_close(col(x), F.linear(x, w, b))

        w_row, b_row = torch.randn(hidden, 24, generator=gen), torch.randn(hidden, generator=gen)
        row = RowParallelLinear(24, hidden, bias=True, input_is_parallel=False, **common)
        row.weight_loader(row.weight, w_row)
        row.bias_loader(row.bias, b_row)
        x24 = torch.randn(5, 24, generator=gen)
        torch.testing.assert_close(row(x24), F.linear(x24, w_row, b_row))

        gate, up = torch.randn(8, hidden, generator=gen), torch.randn(8, hidden, generator=gen)
        merged = MergedColumnParallelLinear(hidden, [8, 8], bias=False, **common)
        merged.weight_loader(merged.weight, gate, 0)
        merged.weight_loader(merged.weight, up, 1)
        local_gate, local_up = merged(x).chunk(2, dim=-1)
        torch.testing.assert_close(ps.tp.all_gather(local_gate), F.linear(x, gate))
        torch.testing.assert_close(ps.tp.all_gather(local_up), F.linear(x, up))

        wq = torch.randn(num_heads * head_dim, hidden, generator=gen)
        wk = torch.randn(num_kv_heads * head_dim, hidden, generator=gen)
        wv = torch.randn(num_kv_heads * head_dim, hidden, generator=gen)
        qkv = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads, bias=False, **common)
        for shard, weight in (("q", wq), ("k", wk), ("v", wv)):
            qkv.weight_loader(qkv.weight, weight, shard)
        q, k, v = qkv(x).split([qkv.q_size, qkv.kv_size, qkv.kv_size], dim=-1)
        torch.testing.assert_close(ps.tp.all_gather(q), F.linear(x, wq))
        kv_head = ps.tp_rank // qkv.num_kv_head_replicas          # replicated when tp > kv heads
        kv_rows = slice(kv_head * qkv.kv_size, (kv_head + 1) * qkv.kv_size)
        torch.testing.assert_close(k, F.linear(x, wk[kv_rows]))
        torch.testing.assert_close(v, F.linear(x, wv[kv_rows]))

        table = torch.randn(vocab, hidden, generator=gen)
        embed = VocabParallelEmbedding(vocab, hidden, **common)
        embed.weight_loader(embed.weight, table)
        ids = torch.tensor([0, 5, 36, 17, 9])
        torch.testing.assert_close(embed(ids), F.embedding(ids, table))
        head = ParallelLMHead(vocab, hidden, **common, tie_to=embed)
        logits = head.compute_logits(x)
        assert logits.shape == (5, vocab)                         # padding rows cut off
        torch.testing.assert_close(logits, F.linear(x, table))
    finally:
        dist.destroy_process_group()


def _check_groups(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from vbatch.parallel.state import init_parallel_state

    ps = init_parallel_state(world_rank=rank, tp_size=2, pp_size=2,
                             init_method=f"tcp://127.0.0.1:{port}", device=torch.device("cpu"),
                             timeout_s=60)
    try:
        assert ps.tp.ranks == [rank - rank % 2, rank - rank % 2 + 1]
        assert ps.pp.ranks == [rank % 2, rank % 2 + 2]
        assert (ps.tp_rank, ps.pp_rank) == (rank % 2, rank // 2)
        assert ps.is_driver == (rank == 2)                        # last stage, tp rank 0
        value = torch.tensor([float(rank)])
        assert ps.tp.all_reduce(value.clone()).item() == sum(ps.tp.ranks)
        assert ps.pp.all_gather(value).tolist() == [float(r) for r in ps.pp.ranks]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_layers_match_unsharded(world):
    mp.spawn(_check_layers, args=(world, _free_port()), nprocs=world, join=True)


def test_tp_pp_groups_follow_reshape_pp_tp():
    mp.spawn(_check_groups, args=(4, _free_port()), nprocs=4, join=True)
