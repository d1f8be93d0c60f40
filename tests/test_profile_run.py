"""The profile step that sizes a GPU's KV cache from measured peak memory.

On CPU: the step runs at the engine's limits (prompts no longer than max_model_len) on a
throwaway cache, leaves no cache behind, and the engine generates exactly as before. On a GPU
(`gpu`): an engine sized by it (no explicit KV budget) generates the same greedy tokens as one
with an explicit budget.
"""
from __future__ import annotations

import pytest
import torch

from vbatch import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "Paris is", "def add(a, b):"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_profile_step_leaves_the_engine_as_it_was(tiny_models):
    llm = LLM(str(tiny_models["llama-gqa-untied"]), dtype="float32", kv_cache_memory_gb=0.01,
              max_model_len=64)
    before = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    runner = llm.llm_engine.executor.worker.model_runner
    caches = [layer.kv_cache for layer in runner.model.attention_layers()]
    seen = []
    original = runner.execute_model

    def recording(step):
        seen.append([len(s.token_ids) for s in step.seqs])
        return original(step)

    runner.execute_model = recording
    cache_bytes = runner.profile_run(300, 2, max_len=64)     # 300 tokens: 5 prompts of <= 64
    runner.execute_model = original
    assert len(seen) == 1 and sum(seen[0]) == 300 and max(seen[0]) <= 64
    assert len(seen[0]) == 5
    layers = runner.model.attention_layers()
    assert cache_bytes == sum(2 * layer.num_kv_heads * layer.head_dim * 4 for layer in layers) \
        * runner.block_size * (1 + sum(-(-n // runner.block_size) for n in seen[0]))
    for layer, cache in zip(layers, caches):
        layer.bind_cache(cache)                   # the engine's own cache, as init_kv_cache does
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cache_sized_from_the_profile_generates_as_an_explicit_budget(tiny_models):
    path = str(tiny_models["llama-gqa-untied"])
    measured = LLM(path, dtype="float32", device="cuda")
    explicit = LLM(path, dtype="float32", device="cuda", kv_cache_memory_gb=0.05)
    assert measured.llm_engine.num_kv_blocks > 1
    assert [o.outputs[0].token_ids for o in measured.generate(PROMPTS, GREEDY)] == \
        [o.outputs[0].token_ids for o in explicit.generate(PROMPTS, GREEDY)]
