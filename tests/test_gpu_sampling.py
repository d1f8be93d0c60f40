"""The sampling-rank features on CUDA equal the CPU engine's: logprobs, penalties, n samples
(copy-on-write block copies on the GPU cache) and structured-output masks (the bitmask is
built on the CPU and applied to GPU logits)."""
from __future__ import annotations

import pytest
import torch

from vbatch import LLM, SamplingParams, StructuredOutputsParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = ["The quick brown fox", "Paris is the capital of", "def add(a, b):"]


def _run(path, device):
    llm = LLM(str(path), dtype="float32", device=device, kv_cache_memory_gb=0.01)
    try:
        scored = llm.generate(PROMPTS, SamplingParams(
            temperature=0.8, seed=4, n=3, max_tokens=8, ignore_eos=True, logprobs=2,
            prompt_logprobs=1, repetition_penalty=1.2, presence_penalty=0.5))
        labels = llm.generate(PROMPTS, SamplingParams(
            temperature=1.0, seed=4, max_tokens=8,
            structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe"])))
    finally:
        llm.llm_engine.shutdown()
    return scored, [o.outputs[0].text for o in labels]


def test_cuda_matches_cpu(tiny_models):
    path = tiny_models["llama-gqa-untied"]
    cpu_scored, cpu_labels = _run(path, "cpu")
    gpu_scored, gpu_labels = _run(path, "cuda")
    assert gpu_labels == cpu_labels and set(gpu_labels) <= {"yes", "no", "maybe"}
    for cpu, gpu in zip(cpu_scored, gpu_scored):
        assert [c.token_ids for c in gpu.outputs] == [c.token_ids for c in cpu.outputs]
        for c_cpu, c_gpu in zip(cpu.outputs, gpu.outputs):
            assert [e.rank for e in c_gpu.token_logprobs] == [e.rank for e in c_cpu.token_logprobs]
            assert [e.logprob for e in c_gpu.token_logprobs] == pytest.approx(
                [e.logprob for e in c_cpu.token_logprobs], abs=1e-3)
        assert [e.logprob for e in gpu.prompt_token_logprobs[1:]] == pytest.approx(
            [e.logprob for e in cpu.prompt_token_logprobs[1:]], abs=1e-3)
