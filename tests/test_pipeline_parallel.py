"""Pipeline parallelism through the `mp` executor (worker processes, gloo on CPU).

Proves: the layer split; for tiny LLaMA (tied and untied, GQA) and GPT-2, pp=2 and tp=2 x pp=2
give greedy tokens identical to tp=pp=1 and logits within 1e-4; the two stages compute at the
same time (their step intervals overlap); a bad pp size is refused up front; a killed stage
fails the engine fast, naming the rank, with no worker process left behind.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from conftest import last_stage_logits

from vbatch import LLM, SamplingParams
from vbatch.engine.executor.base import WorkerError
from vbatch.parallel.pipeline import LAYER_PARTITION_ENV, layer_partition, layer_range

PROMPTS = ["The quick brown fox", "Paris is", "def add(a, b):\n    return a", "Once"] * 2
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _llm(path, tp=1, pp=1, **kwargs):
    return LLM(str(path), dtype="float32", kv_cache_memory_gb=0.01, tensor_parallel_size=tp,
               pipeline_parallel_size=pp, **kwargs)


def test_layer_partition(monkeypatch):
    monkeypatch.delenv(LAYER_PARTITION_ENV, raising=False)
    assert layer_partition(30, 2) == [15, 15]
    assert layer_partition(3, 2) == [2, 1]             # the last stage also runs the LM head
    assert layer_partition(10, 4) == [3, 3, 2, 2]
    assert [layer_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    with pytest.raises(ValueError, match="exceeds the model's 3 layers"):
        layer_partition(3, 4)
    monkeypatch.setenv(LAYER_PARTITION_ENV, "1,2")
    assert layer_range(3, 1, 2) == (1, 3)
    monkeypatch.setenv(LAYER_PARTITION_ENV, "2,2")
    with pytest.raises(ValueError, match="summing to 3"):
        layer_partition(3, 2)


@pytest.mark.parametrize("kind", ["llama-gqa-untied", "llama-gqa-tied", "gpt2"])
def test_pp_matches_single_rank(kind, tiny_models):
    reference = _llm(tiny_models[kind])
    expected = [o.outputs[0].token_ids for o in reference.generate(PROMPTS, GREEDY)]
    token_ids = reference.get_tokenizer().encode(PROMPTS[2])
    expected_logits = last_stage_logits(reference, token_ids)
    # tp x pp together once, on the tied head (the last stage needs the first's embedding);
    # test_ray_executor runs tp=2 x pp=2 on the others
    layouts = ((1, 2), (2, 2)) if kind == "llama-gqa-tied" else ((1, 2),)
    for tp, pp in layouts:
        llm = _llm(tiny_models[kind], tp, pp)
        try:
            got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
            assert got == expected, f"tp={tp} pp={pp}"
            torch.testing.assert_close(last_stage_logits(llm, token_ids), expected_logits,
                                       atol=1e-4, rtol=0)
        finally:
            llm.llm_engine.shutdown()


def test_uneven_split_and_preemption_match(tiny_models, monkeypatch):
    """Layers 1 | 2, and a KV cache so small that the virtual engines preempt."""
    monkeypatch.setenv(LAYER_PARTITION_ENV, "1,2")
    path = tiny_models["llama-gqa-untied"]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = PROMPTS * 2
    reference = LLM(str(path), dtype="float32", kv_cache_memory_gb=0.01, max_model_len=64)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    # 2 virtual engines x ~3 sequences' worth of blocks for 16 rows of up to ~50 tokens; the
    # larger stage (2 of the 3 layers) sets the bytes per block.
    block_bytes = reference.llm_engine.kv_cache_bytes // reference.llm_engine.num_kv_blocks
    budget_gb = (1 + 2 * 18) * (block_bytes * 2 // 3) / (1 << 30)
    llm = LLM(str(path), dtype="float32", kv_cache_memory_gb=budget_gb, max_model_len=64,
              pipeline_parallel_size=2)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        preemptions = sum(ve.scheduler.num_preemptions for ve in llm.llm_engine.virtual_engines)
        assert llm.llm_engine.num_kv_blocks == 1 + 2 * 18
    finally:
        llm.llm_engine.shutdown()
    assert got == expected
    assert preemptions > 0


def test_stages_overlap(tiny_models):
    """With two virtual engines in flight, stage 0 computes one while stage 1 computes the
    other: some step intervals of the two ranks intersect."""
    llm = _llm(tiny_models["llama-gqa-untied"], 1, 2, max_num_seqs=64)
    try:
        llm.generate(PROMPTS * 16, SamplingParams(temperature=0, max_tokens=24,
                                                  ignore_eos=True))
        first, last = llm.llm_engine.executor.collective_rpc("step_trace")
    finally:
        llm.llm_engine.shutdown()
    overlap = sum(max(0.0, min(e0, e1) - max(s0, s1)) for s0, e0 in first for s1, e1 in last)
    assert len(first) == len(last) > 0
    assert overlap > 0


def test_bad_pp_size_is_refused(tiny_models):
    with pytest.raises(ValueError, match="pipeline_parallel_size=4 exceeds this model's 3"):
        _llm(tiny_models["gpt2"], 1, 4)
    with pytest.raises(ValueError, match="pipeline_parallel_size must be >= 1"):
        _llm(tiny_models["gpt2"], 1, 0)


def test_killed_stage_fails_fast_without_orphans(tiny_models):
    llm = _llm(tiny_models["llama-gqa-untied"], 1, 2)
    engine = llm.llm_engine
    processes = list(engine.executor.processes)
    step, calls, killed_at = engine.step, [], []

    def step_then_kill():
        calls.append(1)
        if len(calls) == 5:      # mid-generation: the first stage dies, the last waits on it
            os.kill(processes[0].pid, signal.SIGKILL)
            killed_at.append(time.monotonic())
        return step()

    engine.step = step_then_kill
    with pytest.raises(WorkerError, match="rank 0 died"):
        llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    assert killed_at and time.monotonic() - killed_at[0] < 30
    for process in processes:
        process.join(timeout=10)
        assert not process.is_alive()


def test_each_rank_holds_its_share_of_the_weights(tiny_models):
    """tp=2 x pp=2: every rank holds about a quarter of the weights (3 layers split 2 | 1, so
    stage 0's ranks hold a little more; replicated norms are the only duplicates)."""
    path = tiny_models["llama-gqa-untied"]
    reference = _llm(path)
    total = reference.llm_engine.executor.collective_rpc("parameter_bytes")[0]
    llm = _llm(path, 2, 2)
    try:
        per_rank = llm.llm_engine.executor.collective_rpc("parameter_bytes")
    finally:
        llm.llm_engine.shutdown()
    assert len(per_rank) == 4
    assert all(share < 0.35 * total for share in per_rank), (per_rank, total)
    assert sum(per_rank) < 1.05 * total
