"""n samples per prompt: forked from one prefill, sharing the prompt's KV blocks.

Proves that sample i of a request depends on (seed, row key, i) alone (same alone, in a batch,
after preemption), that sample 0 equals the n=1 output, that samples differ, that the prompt is
prefilled once per request, and that every sample's tokens are what the model computes for
its own history (logprobs equal Hugging Face's on prompt + that sample's tokens, which fails if
copy-on-write of a shared KV block were wrong).
"""
from __future__ import annotations

import math

import pytest
import torch

from vbatch import LLM, SamplingParams

PROMPTS = [f"Row {i}: the quick brown fox" for i in range(50)]


@pytest.fixture(scope="module")
def llm(tiny_models):
    engine = LLM(str(tiny_models["llama-gqa-untied"]), dtype="float32",
                 kv_cache_memory_gb=0.01, block_size=8)
    yield engine
    engine.llm_engine.shutdown()


def _params(**extra):
    settings = {"n": 4, "temperature": 0.8, "seed": 1, "max_tokens": 10, "ignore_eos": True}
    return SamplingParams(**{**settings, **extra})


def _samples(output):
    return [c.token_ids for c in output.outputs]


def _run_keyed(llm, indices, params):
    """Generate PROMPTS[i] for i in `indices` with row key f"row-{i}" (as a job keys rows)."""
    engine = llm.llm_engine
    for i in indices:
        engine.add_request(f"r{i}", engine.encode_prompt(prompt=PROMPTS[i]), params,
                           row_key=f"row-{i}")
    outputs = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id] = output
    return {i: _samples(outputs[f"r{i}"]) for i in indices}


def test_n_samples_differ_and_are_batch_invariant(llm):
    batch = _run_keyed(llm, range(50), _params())
    assert all(len({tuple(s) for s in samples}) > 1 for samples in batch.values())
    for index in (0, 17, 49):
        assert _run_keyed(llm, [index], _params()) == {index: batch[index]}
    out = llm.generate(PROMPTS[:2], _params())
    assert all([c.index for c in o.outputs] == [0, 1, 2, 3] for o in out)


def test_sample_zero_equals_the_single_sample_output(llm):
    many = llm.generate(PROMPTS[:8], _params())
    one = llm.generate(PROMPTS[:8], SamplingParams(temperature=0.8, seed=1, max_tokens=10,
                                                   ignore_eos=True))
    assert [o.outputs[0].token_ids for o in many] == [o.outputs[0].token_ids for o in one]


def test_prompt_prefilled_once_per_request(llm):
    engine = llm.llm_engine
    before = engine.num_prompt_prefills
    llm.generate(PROMPTS[:10], _params())
    assert engine.num_prompt_prefills - before == 10


def test_greedy_samples_are_identical(llm):
    out = llm.generate(PROMPTS[:3], SamplingParams(n=3, temperature=0, max_tokens=12,
                                                   ignore_eos=True))
    single = llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=12,
                                                      ignore_eos=True))
    for o, s in zip(out, single):
        assert _samples(o) == [s.outputs[0].token_ids] * 3


def test_every_sample_continues_its_own_history(llm, tiny_models):
    """Logprobs of each sample equal HF's on prompt + that sample: the KV blocks a sample
    shares with its siblings, and the one it copies on write, hold the right keys/values."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama-gqa-untied"],
                                              torch_dtype=torch.float32).eval()
    for output in llm.generate(PROMPTS[:4], _params(logprobs=0)):
        for completion in output.outputs:
            ids = output.prompt_token_ids + completion.token_ids
            with torch.no_grad():
                expected = torch.log_softmax(hf(torch.tensor([ids])).logits[0], dim=-1)
            start = len(output.prompt_token_ids)
            for i, entry in enumerate(completion.token_logprobs):
                assert math.isclose(entry.logprob, expected[start + i - 1, ids[start + i]].item(),
                                    abs_tol=1e-4)


def test_samples_survive_preemption(tiny_models, llm):
    """A KV cache so small that samples are preempted and recomputed: same samples."""
    roomy = llm.generate(PROMPTS[:12], _params(max_tokens=24))
    tight = LLM(str(tiny_models["llama-gqa-untied"]), dtype="float32", block_size=8,
                kv_cache_memory_gb=40 * 8 * 2 * 3 * 2 * 16 * 4 / (1 << 30), max_model_len=64)
    try:
        squeezed = tight.generate(PROMPTS[:12], _params(max_tokens=24))
        preemptions = sum(ve.scheduler.num_preemptions for ve in tight.llm_engine.virtual_engines)
    finally:
        tight.llm_engine.shutdown()
    assert preemptions > 0
    assert [_samples(o) for o in squeezed] == [_samples(o) for o in roomy]


def test_n_larger_than_max_num_seqs_still_runs(tiny_models):
    small = LLM(str(tiny_models["llama-gqa-untied"]), dtype="float32", kv_cache_memory_gb=0.01,
                max_num_seqs=2)
    try:
        out = small.generate(PROMPTS[:3], _params())
    finally:
        small.llm_engine.shutdown()
    assert [len(o.outputs) for o in out] == [4, 4, 4]


def test_n_is_validated():
    with pytest.raises(ValueError, match="n must be >= 1"):
        SamplingParams(n=0)
