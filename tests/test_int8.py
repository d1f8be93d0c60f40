"""`quantization="int8"`: dynamic W8A8 linear layers on CPU (vbatch/parallel/int8_linear.py).

Proves: the quantized matmul equals an independent float64 computation of the same
quantization (up to float32 rounding) and stays within the rounding error bound of the float
matmul; a column-parallel shard quantizes bit-equal to the slice of the unsharded weight; on a
tiny random LLaMA, int8 logits are within 10% of the float32 logits' range (measured 5.3%),
prefill argmax and the first greedy token agree with float32, and at least 1/3 of the greedy
tokens (measured 30/64: a random model's greedy continuations diverge after one change); pp=2
is bit-equal to pp=1; tp=2 is close to tp=1 but not bit-equal (row-parallel shards take their
activation scales over their own half of K; measured 4.2% of the logits' range); structured
outputs and logprobs work with it; the flag is in the fingerprint, and refused on non-CPU
devices and CPUs without VNNI / AMX.

The native kernels of cpu_int8.c (as built for this CPU, and on x86 also without AVX-512):
the row quantization equals `quantize_per_row` bit for bit (int8 values and scales; float32
and bfloat16 rows, odd row lengths, an all-zero row, a row below the scale's eps, exact .5
ties, strided rows); the int32 rescaling equals acc.float() * s_x * s_w (+ b) cast to
float32 / bfloat16 bit for bit; and `Int8Weight.linear` with them equals its PyTorch fallback
bit for bit (float32 and bfloat16, with and without bias).
"""
from __future__ import annotations

import pytest
import torch
from conftest import last_stage_logits

import vbatch.parallel.int8_linear as int8_linear
from vbatch import LLM, SamplingParams
from vbatch.engine.kernels import cpu_kernels as ck
from vbatch.engine.structured_output import StructuredOutputsParams
from vbatch.jobs.config import FINGERPRINT_FIELDS
from vbatch.parallel.int8_linear import (
    Int8Weight,
    check_int8_supported,
    error_bound,
    quantize_per_row,
)

pytestmark = pytest.mark.skipif(not int8_linear.cpu_has_int8_dot(),
                                reason="CPU without VNNI / AMX-INT8")

PROMPTS = ["The quick brown fox", "Paris is", "def add(a, b):\n    return a", "Once"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _quantize64(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent float64 per-row symmetric int8: (q as float64, scale [R, 1])."""
    t = t.double()
    scale = t.abs().amax(-1, keepdim=True) / 127
    return torch.round(t / scale).clamp(-127, 127), scale


@pytest.mark.parametrize("m", [1, 5, 16, 17, 200, 600])
def test_matmul_equals_float64_of_same_quantization(m):
    torch.manual_seed(m)
    k, n = 96, 40
    x, w, b = torch.randn(m, k) * 3, torch.randn(n, k) * 0.1, torch.randn(n)
    got = Int8Weight(w).linear(x, b)
    x_q, s_x = _quantize64(x)
    w_q, s_w = _quantize64(w)
    expected = (x_q @ w_q.T) * s_x * s_w.T + b.double()
    assert got.dtype == torch.float32 and got.shape == (m, n)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_within_quantization_error_of_float_matmul():
    torch.manual_seed(0)
    x, w = torch.randn(64, 256), torch.randn(128, 256) * 0.05
    exact = x.double() @ w.double().T
    err = (Int8Weight(w).linear(x).double() - exact).abs()
    bound = error_bound(x, w)
    assert (err <= bound + 1e-5).all()
    assert 0 < err.max() < 0.02 * exact.abs().max()       # really int8, and accurate
    # bf16 activations: the same, plus the bf16 rounding of the output
    x16 = x.bfloat16()
    y16 = Int8Weight(w).linear(x16)
    assert y16.dtype == torch.bfloat16 and y16.shape == (64, 128)
    exact16 = x16.double() @ w.double().T
    assert ((y16.double() - exact16).abs() <= error_bound(x16, w) + exact16.abs() / 128).all()


def test_column_shard_quantizes_as_slice_of_whole():
    torch.manual_seed(1)
    w, x = torch.randn(64, 32), torch.randn(7, 32)
    whole = Int8Weight(w)
    shard = Int8Weight(w[32:])
    assert torch.equal(shard.packed, whole.packed[32:])
    assert torch.equal(shard.scale, whole.scale[32:])
    assert torch.equal(shard.linear(x), whole.linear(x)[:, 32:])


def _llm(path, **options):
    return LLM(str(path), dtype="float32", kv_cache_memory_gb=0.01, **options)


def _run(llm):
    try:
        token_ids = llm.get_tokenizer().encode(PROMPTS[2])
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
        return tokens, last_stage_logits(llm, token_ids)
    finally:
        llm.llm_engine.shutdown()


@pytest.fixture(scope="module")
def references(tiny_models):
    path = tiny_models["llama-gqa-untied"]
    return {"float32": _run(_llm(path)), "int8": _run(_llm(path, quantization="int8"))}


def test_int8_logits_and_greedy_close_to_float(references, tiny_models):
    (ref_tokens, ref_logits), (tokens, logits) = references["float32"], references["int8"]
    llm = _llm(tiny_models["llama-gqa-untied"], quantization="int8")
    try:
        model = llm.llm_engine.executor.worker.model_runner.model
        held = {type(m).__name__: type(getattr(m, "packed_weight", None)).__name__
                for m in model.modules() if hasattr(m, "packed_weight")}
        # the loader hands every int8 layer the native kernels (when they build here)
        uses_kernels = {getattr(m.packed_weight, "kernels", None) is ck.cpu_kernels()
                        for m in model.modules() if hasattr(m, "packed_weight")
                        and type(m.packed_weight).__name__ == "Int8Weight"}
    finally:
        llm.llm_engine.shutdown()
    # every linear layer int8; the LM head (ParallelLMHead) kept in the model dtype
    assert {k: v for k, v in held.items() if "Linear" in k} == {
        "QKVParallelLinear": "Int8Weight", "RowParallelLinear": "Int8Weight",
        "MergedColumnParallelLinear": "Int8Weight"}
    assert held.get("ParallelLMHead") != "Int8Weight"
    assert uses_kernels == {True}
    diff = (logits - ref_logits).abs().max()
    assert 1e-3 < diff < 0.1 * ref_logits.abs().max()
    assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))
    assert [t[0] for t in tokens] == [t[0] for t in ref_tokens]
    agree = sum(a == b for got, ref in zip(tokens, ref_tokens) for a, b in zip(got, ref))
    assert agree >= sum(map(len, ref_tokens)) / 3


def test_pp2_equals_pp1(references, tiny_models):
    tokens, logits = _run(_llm(tiny_models["llama-gqa-untied"], quantization="int8",
                               pipeline_parallel_size=2))
    assert tokens == references["int8"][0]
    torch.testing.assert_close(logits, references["int8"][1], atol=1e-5, rtol=0)


def test_tp2_close_to_tp1(references, tiny_models):
    _, logits = _run(_llm(tiny_models["llama-gqa-untied"], quantization="int8",
                          tensor_parallel_size=2))
    ref = references["int8"][1]
    diff = (logits - ref).abs().max()
    assert 0 < diff < 0.1 * ref.abs().max()              # per-shard activation scales
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))


def test_structured_outputs_and_logprobs(tiny_models):
    llm = _llm(tiny_models["llama-gqa-untied"], quantization="int8")
    try:
        labels = ["yes", "no", "maybe"]
        params = SamplingParams(temperature=0, max_tokens=20,
                                structured_outputs=StructuredOutputsParams(choice=labels))
        texts = [o.outputs[0].text for o in llm.generate(PROMPTS, params)]
        assert set(texts) <= set(labels)
        out = llm.generate([PROMPTS[2]], SamplingParams(prompt_logprobs=0, max_tokens=1))[0]
        ids = out.prompt_token_ids
        expected = torch.log_softmax(last_stage_logits(llm, ids).double(), -1)
        for position in range(1, len(ids)):
            got = out.prompt_token_logprobs[position].logprob
            assert abs(got - expected[position - 1, ids[position]].item()) < 1e-4
    finally:
        llm.llm_engine.shutdown()


def test_option_is_fingerprinted_and_refused_where_unsupported(tiny_models, monkeypatch):
    assert "quantization" in FINGERPRINT_FIELDS
    with pytest.raises(ValueError, match="quantization"):
        _llm(tiny_models["llama-gqa-untied"], quantization="int4")
    with pytest.raises(ValueError, match="--quantization int8 runs on CPU only"):
        check_int8_supported("cuda")
    monkeypatch.setattr(int8_linear, "cpu_has_int8_dot", lambda: False)
    with pytest.raises(ValueError, match="--quantization int8 needs a CPU with AVX512-VNNI"):
        _llm(tiny_models["llama-gqa-untied"], quantization="int8")


def _rows_to_quantize(cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Random rows of varied magnitude, plus: all zeros, below the eps of the scale, exact .5
    ties (max 127 -> scale 1; max 63.5 -> scale 0.5), a negative maximum, a single spike."""
    gen = torch.Generator().manual_seed(cols)
    rows = torch.randn(12, cols, generator=gen) * torch.logspace(-3, 3, 12)[:, None]
    ties = torch.arange(cols) % 9 - 4 + 0.5                      # -3.5 .. 4.5, all ties
    special = torch.zeros(6, cols)
    special[1] = 1e-13 * torch.randn(cols, generator=gen)        # amax < 1e-12: eps scale
    special[2], special[2, 0] = ties, 127.0
    special[3], special[3, -1] = ties / 4, -63.5                 # scale 0.5: x / s = ties / 2
    special[4] = -torch.rand(cols, generator=gen)
    special[4, cols // 2] = -5.0
    special[5, cols // 3] = 3.0
    return torch.cat([rows, special]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [1, 15, 16, 61, 576, 1539])  # scalar tail, vectors, both
def test_native_quantize_equals_quantize_per_row(kernels, dtype, cols):
    x = _rows_to_quantize(cols, dtype)
    q, scale = kernels.quantize_rows(x)
    q_ref, scale_ref = quantize_per_row(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (x.shape[0],)
    assert torch.equal(q, q_ref)
    assert torch.equal(scale, scale_ref.reshape(-1))
    if cols >= 9:                  # -2.5 -1.5 -0.5 0.5 1.5 2.5 3.5 4.5: ties, to even
        assert torch.equal(q[-4, 1:9], torch.tensor([-2, -2, 0, 0, 2, 2, 4, 4], dtype=torch.int8))
    # rows strided inside a wider tensor
    wide = torch.zeros(x.shape[0], cols + 7, dtype=dtype)
    wide[:, 3:3 + cols] = x
    q_strided, scale_strided = kernels.quantize_rows(wide[:, 3:3 + cols])
    assert torch.equal(q_strided, q_ref) and torch.equal(scale_strided, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 37), (5, 16), (33, 1541)])
def test_native_dequant_equals_torch_expression(kernels, dtype, with_bias, shape):
    gen = torch.Generator().manual_seed(shape[1])
    rows, cols = shape
    # up to +-2^27: int32 -> float32 rounds too
    acc = torch.randint(-2**27, 2**27, shape, generator=gen, dtype=torch.int32)
    x_scales = torch.rand(rows, generator=gen) * 0.1 + 1e-3
    w_scales = torch.rand(cols, generator=gen) * 1e-3 + 1e-6
    bias = torch.randn(cols, generator=gen) * 100 if with_bias else None
    got = kernels.dequant_int32(acc, x_scales, w_scales, bias, dtype=dtype)
    expected = acc.float().mul_(x_scales[:, None]).mul_(w_scales)
    if with_bias:
        expected.add_(bias)
    expected = expected.to(dtype)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, expected)


def test_native_kernels_reject_tensors_they_cannot_read(kernels):
    with pytest.raises(ValueError):
        kernels.quantize_rows(torch.randn(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError):
        kernels.quantize_rows(torch.randn(8, 4).T)                   # columns strided
    with pytest.raises(ValueError):
        kernels.quantize_rows(torch.randn(2, 4, 8))
    acc = torch.zeros(3, 8, dtype=torch.int32)
    with pytest.raises(ValueError):
        kernels.dequant_int32(acc.long(), torch.ones(3), torch.ones(8))
    with pytest.raises(ValueError):
        kernels.dequant_int32(torch.zeros(8, 3, dtype=torch.int32).T, torch.ones(3),
                              torch.ones(8))
    with pytest.raises(ValueError):
        kernels.dequant_int32(acc, torch.ones(4), torch.ones(8))
    with pytest.raises(ValueError):
        kernels.dequant_int32(acc, torch.ones(3), torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError):
        kernels.dequant_int32(acc, torch.ones(3), torch.ones(8), torch.ones(7))
    with pytest.raises(ValueError):
        kernels.dequant_int32(acc, torch.ones(3), torch.ones(8), dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m", [1, 17, 300])
def test_linear_with_native_kernels_equals_pytorch_fallback(kernels, dtype, with_bias, m):
    torch.manual_seed(m)
    k, n = 577, 200
    weight = Int8Weight(torch.randn(n, k) * 0.05)
    x = (torch.randn(m, k) * 2).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    weight.kernels = kernels
    got = weight.linear(x, bias)
    got_3d = weight.linear(x.view(1, m, k), bias)
    strided = torch.zeros(m, k + 5, dtype=dtype)
    strided[:, 2:2 + k] = x
    got_strided = weight.linear(strided[:, 2:2 + k], bias)
    weight.kernels = None
    expected = weight.linear(x, bias)
    assert got.dtype == dtype and got.shape == (m, n)
    assert torch.equal(got, expected)
    assert got_3d.shape == (1, m, n) and torch.equal(got_3d[0], expected)
    assert torch.equal(got_strided, expected)


def test_linear_float16_and_disabled_kernels_take_the_pytorch_path(kernels, monkeypatch):
    torch.manual_seed(3)
    weight = Int8Weight(torch.randn(24, 40))
    weight.kernels = kernels
    x = torch.randn(5, 40, dtype=torch.float16)
    got = weight.linear(x)                                   # float16: PyTorch ops
    weight.kernels = None
    assert got.dtype == torch.float16 and torch.equal(got, weight.linear(x))
    monkeypatch.setenv("VBATCH_CPU_KERNELS", "0")
    ck.cpu_kernels.cache_clear()
    try:
        assert ck.cpu_kernels() is None     # what the model loader then passes: PyTorch ops
        assert Int8Weight(torch.randn(8, 16), ck.cpu_kernels()).kernels is None
    finally:
        ck.cpu_kernels.cache_clear()
