"""Linear weights packed for oneDNN (vbatch/parallel/cpu_packed.py) change nothing but speed.

The packed matmul is bit-identical to F.linear for bf16 inputs of every batch size the engine
uses (1 row to a prefill chunk), with and without bias; a whole bf16 model's logits and greedy
tokens are identical with packing on and off (VBATCH_PACK_WEIGHTS=0), its strided weights are
released (a tied LM head keeps the embedding's), and float32 models are never packed.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vbatch import LLM, SamplingParams
from vbatch.parallel.cpu_packed import PackedWeight, can_pack

pytestmark = pytest.mark.skipif(not can_pack(torch.zeros(2, 2, dtype=torch.bfloat16)),
                                reason="this PyTorch build cannot pack weights for oneDNN")


@pytest.mark.parametrize("rows", [1, 3, 64, 257])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_is_bit_identical_to_f_linear(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 80, generator=gen).bfloat16()
    bias = torch.randn(96, generator=gen).bfloat16() if with_bias else None
    x = torch.randn(rows, 80, generator=gen).bfloat16()
    assert torch.equal(PackedWeight(weight).linear(x, bias), F.linear(x, weight, bias))


def test_only_cpu_bf16_matrices_are_packed(monkeypatch):
    assert can_pack(torch.zeros(4, 4, dtype=torch.bfloat16))
    assert not can_pack(torch.zeros(4, 4))
    assert not can_pack(torch.zeros(4, dtype=torch.bfloat16))
    monkeypatch.setenv("VBATCH_PACK_WEIGHTS", "0")
    assert not can_pack(torch.zeros(4, 4, dtype=torch.bfloat16))


def _logits_and_tokens(llm, prompts):
    runner = llm.llm_engine.executor.worker.model_runner
    from vbatch.engine.sequence import ScheduledSequence
    seqs = [ScheduledSequence(seq_id=i, token_ids=ids, start_position=0,
                              block_table=list(range(1 + 8 * i, 9 + 8 * i)), temperature=0.0,
                              top_p=1.0, top_k=0, min_p=0.0, seed=0, row_key=str(i),
                              output_index=0) for i, ids in enumerate(prompts)]
    logits = runner.compute_logits(seqs)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                           SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    return logits, [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("kind", ["llama-gqa-tied", "llama-gqa-untied", "gpt2"])
def test_bf16_model_identical_with_and_without_packing(kind, tiny_models, monkeypatch):
    prompts = [[5, 9, 2, 7, 1], [3, 3, 8], [11, 4, 6, 2, 9, 10, 12]]
    packed_llm = LLM(str(tiny_models[kind]), dtype="bfloat16", kv_cache_memory_gb=0.01,
                     block_size=4)
    model = packed_llm.llm_engine.executor.worker.model_runner.model
    linears = [m for m in model.modules() if hasattr(m, "packed_weight")]
    assert linears and all(m.packed_weight is not None for m in linears)
    for m in linears:
        assert m.weight is None or getattr(m, "tied", False)
    packed = _logits_and_tokens(packed_llm, prompts)
    monkeypatch.setenv("VBATCH_PACK_WEIGHTS", "0")
    plain_llm = LLM(str(tiny_models[kind]), dtype="bfloat16", kv_cache_memory_gb=0.01,
                    block_size=4)
    plain = _logits_and_tokens(plain_llm, prompts)
    assert torch.equal(packed[0], plain[0])
    assert packed[1] == plain[1]
    worker = packed_llm.llm_engine.executor.worker
    assert worker.parameter_bytes() >= plain_llm.llm_engine.executor.worker.parameter_bytes()


def test_float32_models_keep_strided_weights(tiny_models):
    llm = LLM(str(tiny_models["llama-gqa-untied"]), dtype="float32", kv_cache_memory_gb=0.01)
    model = llm.llm_engine.executor.worker.model_runner.model
    assert all(m.packed_weight is None for m in model.modules() if hasattr(m, "packed_weight"))
