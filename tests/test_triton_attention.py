"""The Triton paged-attention kernel (vbatch/engine/kernels/triton_attention.py) against an
independent float64 reference that gathers each token's causal context (window included) by
hand from its block table.

Without a GPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1 on CPU tensors).
The interpreter must be chosen before triton is imported, and the rest of the suite imports
triton without it, so all interpreter cases run in one subprocess (this file run as a script)
that prints each case's error; one test per case reads its line. The `gpu` tests run the same
cases on CUDA in this process.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# name -> (sequences as (start position, new tokens), num_kv_heads, group, head_dim,
#          block_size, dtype, window, softcap, options)
CASES = {
    "decode_gqa2": ([(0, 1), (6, 1), (32, 1), (63, 1), (99, 1)], 2, 2, 64, 16, "float32",
                    0, 0.0, ()),
    "prefill_mha_ragged": ([(0, 37), (0, 5), (0, 70)], 2, 1, 64, 16, "float32", 0, 0.0, ()),
    "mixed_chunk_gqa4_bs4_d80": ([(20, 1), (40, 30), (3, 1), (0, 9)], 2, 4, 80, 4, "float32",
                                 0, 0.0, ()),
    "mixed_gqa8_bs32_window": ([(50, 1), (10, 25), (70, 1)], 1, 8, 64, 32, "float32", 16, 0.0,
                               ()),
    "chunk_softcap_window": ([(33, 20), (90, 1)], 2, 2, 64, 16, "float32", 24, 5.0, ()),
    "softcap_d80_bs4": ([(0, 12), (17, 1)], 2, 1, 80, 4, "float32", 0, 2.0, ()),
    "window_covers_all": ([(0, 20), (40, 1)], 2, 2, 64, 16, "float32", 1000, 0.0, ()),
    "window_1": ([(5, 3), (9, 1)], 1, 2, 64, 4, "float32", 1, 0.0, ()),
    "interleaved_strided_int32": ([(10, 6), (0, 4), (30, 1)], 2, 2, 64, 16, "float32", 0, 0.0,
                                  ("interleave", "strided_q", "int32_tables")),
    "long_chunk_multi_tile": ([(130, 20), (200, 1), (75, 1)], 2, 2, 64, 16, "float32", 0, 0.0,
                              ()),
    "bf16_long_window_gqa4_d80": ([(150, 1), (100, 40)], 1, 4, 80, 32, "bfloat16", 100, 0.0,
                                  ()),
    "mixed_d256_gqa2": ([(0, 40), (50, 1)], 1, 2, 256, 16, "float32", 0, 0.0, ()),
    "fp16_decode_d96": ([(9, 1), (70, 1)], 2, 2, 96, 16, "float16", 0, 0.0, ()),
    "bf16_mixed": ([(5, 1), (24, 17), (60, 1)], 2, 2, 64, 16, "bfloat16", 0, 0.0, ()),
    "fp16_mixed_d80_bs32_window": ([(0, 1), (12, 20), (40, 1)], 2, 4, 80, 32, "float16", 20,
                                   0.0, ()),
    "bf16_gqa8_bs4_softcap_window": ([(15, 1), (8, 12)], 1, 8, 64, 4, "bfloat16", 8, 10.0, ()),
}
TOLERANCE = {"float32": 2e-5, "bfloat16": 3e-2, "float16": 4e-3}   # max abs error


def make_case(name: str, device: str) -> dict:
    """Random inputs of a case: a cache with each sequence's blocks scattered at random (block
    0 the zero null block, padding every row), queries for the step's new tokens."""
    seqs, num_kv_heads, group, head_dim, block_size, dtype, window, softcap, options = \
        CASES[name]
    dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    needed = [-(-(start + n) // block_size) for start, n in seqs]
    num_blocks = 1 + sum(needed) + 3
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max(needed) + 1                           # one spare column of padding
    tables = torch.zeros((len(seqs), width), dtype=torch.int64)
    for row, count in enumerate(needed):
        tables[row, :count] = torch.tensor([order.pop() for _ in range(count)])
    cache = torch.randn((2, num_kv_heads, num_blocks, block_size, head_dim), generator=gen)
    cache[:, :, 0] = 0
    token_seq = torch.tensor([row for row, (_, n) in enumerate(seqs) for _ in range(n)])
    token_ctx = torch.tensor([start + i + 1 for start, n in seqs for i in range(n)])
    if "interleave" in options:
        perm = torch.randperm(len(token_seq), generator=gen)
        token_seq, token_ctx = token_seq[perm], token_ctx[perm]
    num_heads = num_kv_heads * group
    q = 2 * torch.randn((len(token_seq), num_heads * head_dim), generator=gen)
    if "strided_q" in options:     # q as a slice of a fused qkv projection
        q = torch.cat([q, torch.randn((len(q), 2 * num_kv_heads * head_dim), generator=gen)],
                      1)[:, :num_heads * head_dim]
    if "int32_tables" in options:
        tables = tables.to(torch.int32)
    return dict(q=q.to(device, dtype), kv_cache=cache.to(device, dtype),
                block_tables=tables.to(device), token_seq_index=token_seq.to(device),
                token_context_lens=token_ctx.to(device), max_context=width * block_size,
                num_heads=num_heads, scale=1 / math.sqrt(head_dim), window=window,
                softcap=softcap)


def reference(q, kv_cache, block_tables, token_seq_index, token_context_lens, max_context,
              num_heads, scale, window, softcap) -> torch.Tensor:
    """float64 attention of each token over its own context, keys gathered one position at a
    time from the token's block-table row."""
    _, num_kv_heads, _, block_size, head_dim = kv_cache.shape
    group = num_heads // num_kv_heads
    cache = kv_cache.double().cpu()
    tables = block_tables.cpu().long()
    out = torch.empty((q.shape[0], num_heads, head_dim), dtype=torch.float64)
    for t in range(q.shape[0]):
        n = int(token_context_lens[t])
        begin = max(0, n - window) if window else 0
        row = tables[int(token_seq_index[t])]
        positions = range(begin, n)
        blocks = torch.tensor([int(row[p // block_size]) for p in positions])
        offsets = torch.tensor([p % block_size for p in positions])
        keys, values = cache[0][:, blocks, offsets], cache[1][:, blocks, offsets]  # [Hkv, L, d]
        query = q[t].double().cpu().view(num_heads, head_dim)
        for h in range(num_heads):
            s = keys[h // group] @ query[h] * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            out[t, h] = torch.softmax(s, 0) @ values[h // group]
    return out.view(q.shape[0], num_heads * head_dim)


def run_case(name: str, device: str) -> dict:
    """The kernel's max abs error against the reference, and its output's dtype/shape."""
    from vbatch.engine.kernels.triton_attention import paged_attention

    inputs = make_case(name, device)
    window, softcap = inputs.pop("window"), inputs.pop("softcap")
    args = list(inputs.values())
    out = paged_attention(*args, window=window, softcap=softcap)
    expected = reference(*args, window, softcap)
    return dict(error=float((out.double().cpu() - expected).abs().max()),
                dtype=str(out.dtype).removeprefix("torch."), shape=list(out.shape),
                expected_shape=list(inputs["q"].shape))


def _check(name: str, result: dict) -> None:
    dtype = CASES[name][5]
    assert result["dtype"] == dtype and result["shape"] == result["expected_shape"]
    assert result["error"] <= TOLERANCE[dtype], f"{name}: max error {result['error']:.3g}"


@pytest.fixture(scope="module")
def interpreted_results() -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_matches_reference(name, interpreted_results):
    _check(name, interpreted_results[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_matches_reference(name):
    _check(name, run_case(name, "cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_large_shapes():
    """Production-like shapes on CUDA: head_dim 96/128/256, long contexts, many tiles."""
    for head_dim, group, dtype in ((128, 4, "bfloat16"), (96, 1, "float16"), (256, 2,
                                                                              "bfloat16")):
        CASES["_large"] = ([(0, 300), (700, 1), (1500, 1), (400, 129)], 2, group, head_dim, 16,
                           dtype, 0, 0.0, ())
        try:
            _check("_large", run_case("_large", "cuda"))
        finally:
            del CASES["_large"]


def test_tile_table_covers_every_token_once():
    pytest.importorskip("triton")
    from vbatch.engine.kernels.triton_attention import build_tile_table

    seq = torch.tensor([0, 1, 1, 1, 1, 1, 2, 0, 0, 3, 3])
    ctx = torch.tensor([5, 1, 2, 3, 4, 5, 9, 6, 8, 2, 3])   # 0 at 5 then 6 (new run), 8 (gap)
    tiles = build_tile_table(seq, ctx, block_q=2)
    covered = []
    for table in (tiles.decode, tiles.prefill):
        for start, length in table.t().tolist():
            assert 1 <= length <= 2
            run = list(range(start, start + length))
            assert len(set(seq[run].tolist())) == 1
            assert ctx[run].tolist() == list(range(int(ctx[start]), int(ctx[start]) + length))
            covered += run
    assert sorted(covered) == list(range(len(seq)))
    assert (tiles.decode[1] == 1).all() and (tiles.prefill[1] > 1).all()
    assert tiles.prefill.shape[1] == 3    # (1,2) (3,4) (9,10); token 5 ends run 1 alone


def test_bad_arguments_raise_value_error():
    pytest.importorskip("triton")
    from vbatch.engine.kernels.triton_attention import paged_attention

    inputs = make_case("decode_gqa2", "cpu")
    window, softcap = inputs.pop("window"), inputs.pop("softcap")

    def call(**changes):
        kwargs = {**inputs, "window": window, "softcap": softcap, **changes}
        with pytest.raises(ValueError):
            paged_attention(**kwargs)

    call(q=inputs["q"].half())
    call(num_heads=3)
    call(window=-1)
    call(softcap=-1.0)
    call(q=inputs["q"][:, :64])
    call(block_tables=inputs["block_tables"].float())
    call(kv_cache=inputs["kv_cache"][:, :, :, :3])          # block size 3
    call(token_context_lens=inputs["token_context_lens"][:2])
    call(max_context=10 ** 6)
    call(token_seq_index=inputs["token_seq_index"] + 10)     # rows past the block table
    if os.environ.get("TRITON_INTERPRET") != "1":
        call()                                               # CPU tensors, no interpreter


def _main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the tests do)")
    print(json.dumps({name: run_case(name, "cpu") for name in CASES}))


if __name__ == "__main__":
    _main()
