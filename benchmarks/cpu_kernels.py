"""Native CPU kernels vs. the PyTorch ops they replace, timed in the same run.

Each row times one layer-sized call at the shapes of the throughput workload (SmolLM2-135M:
9 query / 3 KV heads of 64, hidden 576, intermediate 1536; bf16 by default) and prints the
PyTorch time, the native time and their ratio:

- decode attention: 256 sequences, contexts 50-120, KV blocks of 8 scattered over the cache;
  PyTorch = the engine's fallback path (block gather + bmm/SDPA with masks), through
  `PagedAttention` with and without kernels (the same metadata);
- prefill attention: 64 prompts of 32 tokens and 4 prompts of 512;
- residual add + RMSNorm, SiLU-and-multiply, rotary embedding at 256 tokens.

Then the native attention kernel alone with the per-layer options, against itself without
them, at decode over 32 sequences of 2048 cached tokens: a sliding window longer than the
context (4096: must cost nothing), a window of 512 (reads a quarter of the keys: should take
about a quarter of the time) and a logit softcap of 50 (Gemma 2: a tanh per score).

Run from the repository root (after `pip install -e .`), on an otherwise idle machine:

    python benchmarks/cpu_kernels.py [--dtype float32] [--repeats 50]

Prints a table and, as the last line, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 8


def attention_inputs(seq_lens, query_lens, dtype):
    """(cache, metadata, q, k, v) of one layer's step over the given sequences."""
    from vbatch.engine.layers.attention import allocate_kv_cache
    from vbatch.engine.model_runner import ModelRunner
    from vbatch.engine.sequence import ScheduledSequence

    heads, kv_heads, head_dim, block_size = HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE
    gen = torch.Generator().manual_seed(0)
    blocks_needed = sum(-(-n // block_size) for n in seq_lens)
    free = (torch.randperm(blocks_needed + 1, generator=gen) + 1).tolist()
    cache = allocate_kv_cache(blocks_needed + 2, block_size, kv_heads, head_dim, dtype,
                              torch.device("cpu"))
    cache.copy_(torch.randn(cache.shape, generator=gen).to(dtype))
    seqs = []
    for index, (n, q) in enumerate(zip(seq_lens, query_lens)):
        table = [free.pop() for _ in range(-(-n // block_size))]
        seqs.append(ScheduledSequence(seq_id=index, token_ids=[1] * q, start_position=n - q,
                                      block_table=table, temperature=0.0, top_p=1.0, top_k=0,
                                      min_p=0.0, seed=0, row_key=str(index), output_index=0))
    runner = ModelRunner(None, block_size=block_size, device=torch.device("cpu"), dtype=dtype)
    _, _, meta, _ = runner._prepare(seqs)
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads * head_dim, generator=gen).to(dtype)
    k = torch.randn(tokens, kv_heads * head_dim, generator=gen).to(dtype)
    v = torch.randn(tokens, kv_heads * head_dim, generator=gen).to(dtype)
    return cache, meta, q, k, v


def attention_case(seq_lens, query_lens, dtype, kernels):
    """(PyTorch call, native call) of one attention layer over the given sequences."""
    from vbatch.engine.layers.attention import PagedAttention

    cache, meta, q, k, v = attention_inputs(seq_lens, query_lens, dtype)
    layers = []
    for native in (False, True):
        layer = PagedAttention(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM ** -0.5)
        layer.bind_cache(cache)
        layer.kernels = kernels if native else None
        layers.append(layer)
    return [lambda layer=layer: layer(q, k, v, meta) for layer in layers]


def layer_option_cases(dtype, kernels):
    """{label: native attention call} at decode, 32 sequences x 2048 cached tokens; the first
    has no options (the baseline of the others)."""
    from vbatch.engine.layers.attention import PagedAttention

    cache, meta, q, k, v = attention_inputs([2048] * 32, [1] * 32, dtype)
    options = {"no window, no softcap": {}, "window 4096 (> context)": {"sliding_window": 4096},
               "window 512": {"sliding_window": 512}, "softcap 50": {"logit_softcap": 50.0}}
    calls = {}
    for label, kwargs in options.items():
        layer = PagedAttention(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM ** -0.5, **kwargs)
        layer.bind_cache(cache)
        layer.kernels = kernels
        calls[label] = lambda layer=layer: layer(q, k, v, meta)
    return calls


def elementwise_cases(dtype, kernels):
    """{name: (PyTorch call, native call)} at 256 tokens."""
    from types import SimpleNamespace

    from vbatch.engine.layers.rotary import RotaryEmbedding
    gen = torch.Generator().manual_seed(1)
    tokens, hidden, inter = 256, 576, 1536
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    residual = torch.randn(tokens, hidden, generator=gen).to(dtype)
    weight = torch.rand(hidden, generator=gen).to(dtype)
    gate_up = torch.randn(tokens, 2 * inter, generator=gen).to(dtype)
    qkv = torch.randn(tokens, 15 * 64, generator=gen).to(dtype)
    positions = torch.randint(0, 2048, (tokens,), generator=gen)
    config = SimpleNamespace(rope_theta=100000.0, rope_scaling=None)
    cpu = torch.device("cpu")
    rope_torch = RotaryEmbedding(config, 64, 2048, dtype, cpu)
    rope_torch.kernels = None                       # the PyTorch path, for the baseline
    rope_native = RotaryEmbedding(config, 64, 2048, dtype, cpu)
    return {
        "residual add + RMSNorm": (
            lambda: F.rms_norm(x + residual, (hidden,), weight, 1e-5),
            lambda: kernels.rms_norm(x, weight, 1e-5, residual.clone())),
        "SiLU-and-multiply": (
            lambda: F.silu(gate_up[:, :inter]) * gate_up[:, inter:],
            lambda: kernels.silu_and_mul(gate_up)),
        "rotary (q and k heads)": (
            lambda: rope_torch.at(positions).rotate_(qkv, 12),
            lambda: rope_native.at(positions).rotate_(qkv, 12)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    from vbatch.engine.kernels.cpu_kernels import cpu_kernels
    kernels = cpu_kernels()
    if kernels is None:
        print("cpu_kernels: error: the native kernels could not be built here (no C compiler?)",
              file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(2)
    decode_lens = torch.randint(50, 121, (256,), generator=gen).tolist()
    cases = {
        "decode attention, 256 seqs x 50-120 ctx": attention_case(
            decode_lens, [1] * 256, dtype, kernels),
        "prefill attention, 64 x 32 tokens": attention_case([32] * 64, [32] * 64, dtype, kernels),
        "prefill attention, 4 x 512 tokens": attention_case([512] * 4, [512] * 4, dtype, kernels),
        **elementwise_cases(dtype, kernels),
    }
    rows = []
    print(f"{args.dtype}, {torch.get_num_threads()} threads, median of {args.repeats} calls")
    print(f"  {'operation':42} {'PyTorch ms':>11} {'native ms':>10} {'speed-up':>9}")
    for name, (torch_call, native_call) in cases.items():
        torch_s, native_s = timed(torch_call, args.repeats), timed(native_call, args.repeats)
        rows.append({"operation": name, "torch_ms": round(torch_s * 1e3, 3),
                     "native_ms": round(native_s * 1e3, 3),
                     "speedup": round(torch_s / native_s, 2)})
        print(f"  {name:42} {torch_s * 1e3:11.3f} {native_s * 1e3:10.3f} "
              f"{torch_s / native_s:8.2f}x")
    option_rows, baseline = [], None
    print("native attention with layer options, decode 32 seqs x 2048 ctx")
    print(f"  {'options':42} {'native ms':>11} {'vs none':>10}")
    for label, call in layer_option_cases(dtype, kernels).items():
        seconds = timed(call, args.repeats)
        baseline = baseline or seconds
        option_rows.append({"options": label, "native_ms": round(seconds * 1e3, 3),
                            "ratio": round(seconds / baseline, 3)})
        print(f"  {label:42} {seconds * 1e3:11.3f} {seconds / baseline:9.3f}x")
    print(json.dumps({"dtype": args.dtype, "threads": torch.get_num_threads(), "rows": rows,
                      "layer_options": option_rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
