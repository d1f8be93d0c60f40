"""The native CPU kernels (vbatch/engine/kernels) against independent float64 computations.

paged_attention: every token's output equals softmax(scale q K^T) V over its visible cached
keys, computed per token in float64 from the gathered blocks, for GQA group sizes 1..8, head
sizes 16..128, block sizes 1..16, context lengths 1 to several blocks (including exact block
multiples), shuffled block tables, rows strided inside larger tensors (as the model passes
them), in float32 (1e-5) and bfloat16 (the output's own rounding). write_kv_cache equals
advanced-index assignment. Also: peaked softmax (scores spread over hundreds, most weights
underflow to 0), the build cache, and the fallback switches. With a sliding window W (token of
context n sees positions n - W..n-1, windows starting mid-block) and a logit softcap c (scores
c * tanh(s / c)), alone and together, against the same reference; cached positions before a
token's window hold NaN in one test, so reading them at all would show.

The fused elementwise kernels against the PyTorch op chains of Hugging Face's LLaMA
(LlamaRMSNorm, silu(gate) * up, apply_rotary_pos_emb): bit-identical in bfloat16, within float32
rounding in float32; and the PyTorch fallback of the rotary embedding against the kernel.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from vbatch.engine.kernels import cpu_kernels as ck


def reference_attention(q, cache, block_tables, token_seq, token_context, num_heads, scale,
                        window=None, softcap=None):
    """Per token, in float64: gather the sequence's visible keys/values and attend (with
    `window`, only the last `window` of them; with `softcap` c, scores s -> c tanh(s / c))."""
    num_tokens = q.shape[0]
    _, num_kv_heads, _, block_size, head_dim = cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float64)
    for t in range(num_tokens):
        n = int(token_context[t])
        blocks = block_tables[int(token_seq[t]), : -(-n // block_size)]
        first = 0 if window is None else max(0, n - window)
        keys = cache[0][:, blocks].reshape(num_kv_heads, -1, head_dim)[:, first:n].double()
        values = cache[1][:, blocks].reshape(num_kv_heads, -1, head_dim)[:, first:n].double()
        queries = q[t].view(num_kv_heads, group, head_dim).double()
        scores = queries @ keys.transpose(-1, -2) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        weights = torch.softmax(scores, dim=-1)
        out[t] = (weights @ values).reshape(num_heads, head_dim)
    return out.view(num_tokens, num_heads * head_dim)


def random_case(gen, *, num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_len,
                dtype, query_pad=0):
    """A cache with shuffled block tables and tokens that each see a prefix of a sequence."""
    lengths = torch.randint(1, max_len + 1, (num_seqs,), generator=gen)
    max_blocks = -(-int(lengths.max()) // block_size)
    num_blocks = num_seqs * max_blocks + 1
    cache = (torch.randn(2, num_kv_heads, num_blocks, block_size, head_dim, generator=gen)
             .to(dtype))
    block_tables = (torch.randperm(num_blocks - 1, generator=gen)[: num_seqs * max_blocks] + 1
                    ).view(num_seqs, max_blocks)
    # several tokens per sequence (as in a prefill), each with its own causal context
    token_seq, token_context = [], []
    for s, n in enumerate(lengths.tolist()):
        for ctx in sorted({n, max(1, n - 1), max(1, n // 2)}):
            token_seq.append(s)
            token_context.append(ctx)
    num_tokens = len(token_seq)
    # q rows strided inside a wider tensor, like the q slice of a fused qkv projection
    wide = torch.randn(num_tokens, num_heads * head_dim + query_pad, generator=gen).to(dtype)
    q = wide[:, : num_heads * head_dim]
    return (q, cache, block_tables, torch.tensor(token_seq), torch.tensor(token_context),
            max_blocks * block_size)


CASES = [  # num_heads, num_kv_heads, head_dim, block_size, max_len
    (4, 4, 16, 1, 5),
    (9, 3, 64, 8, 90),
    (8, 2, 128, 16, 70),
    (8, 1, 32, 4, 33),
    (6, 2, 80, 16, 16),
    (16, 2, 64, 8, 40),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "h{}-kv{}-d{}-bs{}-len{}".format(*c))
def test_paged_attention_matches_float64_reference(kernels, case, dtype):
    num_heads, num_kv_heads, head_dim, block_size, max_len = case
    gen = torch.Generator().manual_seed(sum(case))
    q, cache, tables, token_seq, token_context, max_context = random_case(
        gen, num_seqs=7, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, max_len=max_len, dtype=dtype, query_pad=3 * head_dim)
    scale = 1 / math.sqrt(head_dim)
    got = kernels.paged_attention(q, cache, tables, token_seq, token_context, max_context,
                                  num_heads, scale)
    expected = reference_attention(q, cache, tables, token_seq, token_context, num_heads, scale)
    assert got.dtype == dtype and got.shape == expected.shape
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3   # bf16: the output's own rounding
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


WINDOW_CASES = [  # num_heads, num_kv_heads, head_dim, block_size, max_len, window, softcap
    (8, 2, 32, 4, 40, 5, None),
    (8, 2, 32, 4, 40, None, 2.0),
    (8, 2, 32, 4, 40, 5, 2.0),
    (9, 3, 64, 16, 90, 16, None),      # window = one block: its start moves through blocks
    (4, 4, 16, 1, 12, 1, None),        # each token sees only itself
    (6, 2, 80, 8, 30, 64, 30.0),       # window longer than every context
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", WINDOW_CASES,
                         ids=lambda c: "h{}-kv{}-d{}-bs{}-len{}-w{}-cap{}".format(*c))
def test_paged_attention_window_and_softcap_match_float64_reference(kernels, case, dtype):
    num_heads, num_kv_heads, head_dim, block_size, max_len, window, softcap = case
    gen = torch.Generator().manual_seed(block_size * max_len + head_dim)
    q, cache, tables, token_seq, token_context, max_context = random_case(
        gen, num_seqs=7, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, max_len=max_len, dtype=dtype, query_pad=head_dim)
    q = q * 3.0       # scores of several units, so a softcap of 2 changes them noticeably
    scale = 1 / math.sqrt(head_dim)
    got = kernels.paged_attention(q, cache, tables, token_seq, token_context, max_context,
                                  num_heads, scale, window=window or 0, softcap=softcap or 0.0)
    expected = reference_attention(q, cache, tables, token_seq, token_context, num_heads,
                                   scale, window, softcap)
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)
    if max_len > (window or max_len) or (softcap is not None and softcap < 10):
        plain = reference_attention(q, cache, tables, token_seq, token_context, num_heads, scale)
        assert (plain - expected).abs().max() > 0.1        # the option mattered here


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_never_reads_keys_before_the_window(kernels, dtype):
    """Decode tokens (one per sequence) whose cached positions before their window are NaN:
    any read of them (even one masked afterwards) would turn the output into NaN."""
    gen = torch.Generator().manual_seed(11)
    num_heads, num_kv_heads, head_dim, block_size, window = 4, 2, 32, 4, 6
    q, cache, tables, _, _, max_context = random_case(
        gen, num_seqs=6, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, max_len=37, dtype=dtype)
    contexts = torch.tensor([1, 6, 7, 13, 24, 37])[: tables.shape[0]]
    contexts = torch.minimum(contexts, torch.tensor(tables.shape[1] * block_size))
    token_seq = torch.arange(len(contexts))
    for s, n in enumerate(contexts.tolist()):
        for position in range(max(0, n - window)):
            block = tables[s, position // block_size]
            cache[:, :, block, position % block_size] = float("nan")
    got = kernels.paged_attention(q[: len(contexts)], cache, tables, token_seq, contexts,
                                  max_context, num_heads, 0.2, window=window)
    expected = reference_attention(q[: len(contexts)], cache, tables, token_seq, contexts,
                                   num_heads, 0.2, window)
    assert not got.isnan().any() and not expected.isnan().any()
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


def test_peaked_softmax_and_underflowing_weights(kernels):
    """Scores spread over hundreds: most weights underflow to exactly 0 after exp, and the
    result is still the float64 softmax (including ties in the maximum) up to float32's
    rounding of scores that large."""
    gen = torch.Generator().manual_seed(1)
    q, cache, tables, token_seq, token_context, max_context = random_case(
        gen, num_seqs=5, num_heads=4, num_kv_heads=2, head_dim=32, block_size=8, max_len=60,
        dtype=torch.float32)
    q = q * 30.0
    cache[0, :, 1] = cache[0, :, 2]          # duplicated keys: exactly tied scores
    got = kernels.paged_attention(q, cache, tables, token_seq, token_context, max_context, 4,
                                  32 ** -0.5)
    expected = reference_attention(q, cache, tables, token_seq, token_context, 4, 32 ** -0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_equals_index_assignment(kernels, dtype):
    gen = torch.Generator().manual_seed(2)
    num_kv_heads, num_blocks, block_size, head_dim, num_tokens = 3, 10, 4, 16, 13
    cache = torch.randn(2, num_kv_heads, num_blocks, block_size, head_dim, generator=gen).to(dtype)
    expected = cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    fused = torch.randn(num_tokens, 5 * num_kv_heads * head_dim, generator=gen).to(dtype)
    k = fused[:, : num_kv_heads * head_dim]                       # strided rows, as in the model
    v = fused[:, 2 * num_kv_heads * head_dim: 3 * num_kv_heads * head_dim]
    kernels.write_kv_cache(cache, k, v, slots)
    flat = expected.view(2, num_kv_heads, -1, head_dim)
    flat[0][:, slots] = k.reshape(num_tokens, num_kv_heads, head_dim).transpose(0, 1)
    flat[1][:, slots] = v.reshape(num_tokens, num_kv_heads, head_dim).transpose(0, 1)
    assert torch.equal(cache, expected)


def test_rejects_tensors_it_cannot_read(kernels):
    cache = torch.zeros(2, 1, 4, 4, 16)
    with pytest.raises(ValueError, match="contiguous rows"):
        kernels.write_kv_cache(cache, torch.zeros(16, 2).t(),
                               torch.zeros(2, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.paged_attention(torch.zeros(1, 16), cache.bfloat16(), torch.zeros(1, 1).long(),
                                torch.tensor([0]), torch.tensor([1]), 4, 1, 1.0)
    for bad in ({"window": -1}, {"softcap": -2.0}):
        with pytest.raises(ValueError, match="must be >= 0"):
            kernels.paged_attention(torch.zeros(1, 16), cache, torch.zeros(1, 1).long(),
                                    torch.tensor([0]), torch.tensor([1]), 4, 1, 1.0, **bad)


def test_supports():
    assert ck.CpuKernels.supports(torch.bfloat16, 64)
    assert ck.CpuKernels.supports(torch.float32, 80)
    assert not ck.CpuKernels.supports(torch.float16, 64)
    assert not ck.CpuKernels.supports(torch.float32, 8)


def test_build_is_cached_per_source_and_cpu(tmp_path, kernels):
    first = ck.build_library(tmp_path, "cc")
    stamp = first.stat().st_mtime_ns
    assert ck.build_library(tmp_path, "cc") == first and first.stat().st_mtime_ns == stamp
    assert not list(first.parent.glob("*.tmp"))


@pytest.mark.parametrize("env", [{"VBATCH_CPU_KERNELS": "0"}, {"CC": "/nonexistent/cc"}])
def test_falls_back_to_pytorch_when_disabled_or_unbuildable(env, tmp_path):
    code = ("from vbatch.engine.kernels.cpu_kernels import cpu_kernels; "
            "print(cpu_kernels() is None)")
    import os
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "VBATCH_CACHE_DIR": str(tmp_path), **env},
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def assert_matches_torch_chain(got, expected):
    if got.dtype == torch.bfloat16:
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 61])          # vector loop only; scalar tail too
def test_rms_norm_and_fused_residual_add_match_hf(kernels, dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(37, hidden, generator=gen).to(dtype)
    residual = torch.randn(37, hidden, generator=gen).to(dtype)
    norm = LlamaRMSNorm(hidden, eps=1e-5)
    norm.weight.data = torch.rand(hidden, generator=gen) + 0.5
    norm = norm.to(dtype)
    assert_matches_torch_chain(kernels.rms_norm(x, norm.weight, 1e-5), norm(x))
    updated = residual.clone()
    out = kernels.rms_norm(x, norm.weight, 1e-5, residual=updated)
    assert torch.equal(updated, x + residual)            # the residual stream, in place
    assert_matches_torch_chain(out, norm(x + residual))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1536, 37])
def test_silu_and_mul_matches_torch(kernels, dtype, width):
    gen = torch.Generator().manual_seed(width)
    gate_up = (torch.randn(29, 2 * width, generator=gen) * 6).to(dtype)   # saturating values too
    gate_up[0, :4] = torch.tensor([0.0, -100.0, 100.0, -0.0])
    expected = F.silu(gate_up[:, :width]) * gate_up[:, width:]
    assert_matches_torch_chain(kernels.silu_and_mul(gate_up), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 40])
def test_rotary_matches_hf_and_the_pytorch_fallback(kernels, dtype, head_dim):
    from types import SimpleNamespace

    from vbatch.engine.layers.rotary import RotaryEmbedding
    config = SimpleNamespace(rope_theta=10000.0, rope_scaling=None)
    native = RotaryEmbedding(config, head_dim, 512, dtype, torch.device("cpu"))
    assert native.kernels is not None          # it picks the native kernel itself
    fallback = RotaryEmbedding(config, head_dim, 512, dtype, torch.device("cpu"))
    fallback.kernels = None
    gen = torch.Generator().manual_seed(head_dim)
    num_tokens, heads, untouched = 23, 7, 3 * head_dim
    rows = torch.randn(num_tokens, heads * head_dim + untouched, generator=gen).to(dtype)
    positions = torch.randint(0, 512, (num_tokens,), generator=gen)
    q = rows[:, : heads * head_dim].reshape(num_tokens, heads, head_dim).transpose(0, 1)
    expected, _ = apply_rotary_pos_emb(q.unsqueeze(0), q.unsqueeze(0),
                                       native.cos[positions].unsqueeze(0),
                                       native.sin[positions].unsqueeze(0))
    expected = expected[0].transpose(0, 1).reshape(num_tokens, heads * head_dim)
    by_kernel, by_torch = rows.clone(), rows.clone()
    native.at(positions).rotate_(by_kernel, heads)
    fallback.at(positions).rotate_(by_torch, heads)
    assert_matches_torch_chain(by_kernel[:, : heads * head_dim], expected)
    assert_matches_torch_chain(by_torch[:, : heads * head_dim], expected)
    assert torch.equal(by_kernel[:, heads * head_dim:], rows[:, heads * head_dim:])
