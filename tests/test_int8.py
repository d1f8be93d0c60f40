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
"""
from __future__ import annotations

import pytest
import torch
from conftest import last_stage_logits

import vbatch.parallel.int8_linear as int8_linear
from vbatch import LLM, SamplingParams
from vbatch.engine.structured_output import StructuredOutputsParams
from vbatch.jobs.config import FINGERPRINT_FIELDS
from vbatch.parallel.int8_linear import Int8Weight, check_int8_supported, error_bound

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
    finally:
        llm.llm_engine.shutdown()
    # every linear layer int8; the LM head (ParallelLMHead) kept in the model dtype
    assert {k: v for k, v in held.items() if "Linear" in k} == {
        "QKVParallelLinear": "Int8Weight", "RowParallelLinear": "Int8Weight",
        "MergedColumnParallelLinear": "Int8Weight"}
    assert held.get("ParallelLMHead") != "Int8Weight"
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
