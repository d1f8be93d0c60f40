"""Our engine against Hugging Face transformers on tiny random checkpoints (float32).

Proves: prefill logits and paged-decode logits within 1e-4 of HF's forward pass on ragged
prompts, and greedy generations token-identical to HF `generate`, for LLaMA with GQA (tied and
untied heads, default and llama3 rope scaling) and GPT-2, both with the native CPU kernels and
with PyTorch ops only (the path of GPUs and of machines without a C compiler).
"""
from __future__ import annotations

import pytest
import torch
from conftest import without_native_kernels
from transformers import AutoModelForCausalLM, AutoTokenizer

from vbatch import LLM, SamplingParams
from vbatch.engine.sequence import ScheduledSequence

KINDS = ["llama-gqa-untied", "llama-gqa-tied", "gpt2", "llama-rope-llama3-untied"]
PROMPTS = ["The quick brown fox", "Paris is", "def add(a, b):\n    return a",
           "Once upon a time there was a small language model that liked numbers 0123456789."]


@pytest.fixture(scope="module", params=["native-kernels", "torch-ops"])
def engines(request, tiny_models):
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "torch-ops":
            without_native_kernels(patch)
        return {kind: LLM(str(tiny_models[kind]), dtype="float32", kv_cache_memory_gb=0.02,
                          block_size=4)
                for kind in KINDS}


def test_each_engine_runs_the_backend_it_names(engines, request):
    native = request.node.callspec.params["engines"] == "native-kernels"
    for llm in engines.values():
        layers = _runner(llm).model.attention_layers()
        assert all((layer.kernels is not None) == native for layer in layers)


def _hf(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _scheduled(token_ids, start, block_table):
    return ScheduledSequence(seq_id=0, token_ids=token_ids, start_position=start,
                             block_table=block_table, temperature=0.0, top_p=1.0, top_k=0,
                             min_p=0.0, seed=0, row_key="k", output_index=0)


def _runner(llm):
    return llm.llm_engine.executor.worker.model_runner


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_logits_match_hf_on_ragged_batch(kind, tiny_models, engines):
    hf, tokenizer = _hf(tiny_models[kind])
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    block_size = 4
    seqs, next_block = [], 1          # block 0 is the null block
    for ids in prompts:
        num_blocks = -(-len(ids) // block_size)
        seqs.append(_scheduled(ids, 0, list(range(next_block, next_block + num_blocks))[::-1]))
        next_block += num_blocks
    logits = _runner(engines[kind]).compute_logits(seqs)
    offset = 0
    for ids in prompts:
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(logits[offset:offset + len(ids)], expected, atol=1e-4, rtol=0)
        offset += len(ids)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_logits_match_hf(kind, tiny_models, engines):
    """Prefill a prefix, then feed tokens one at a time through the paged KV cache."""
    hf, tokenizer = _hf(tiny_models[kind])
    ids = tokenizer.encode(PROMPTS[3])
    runner = _runner(engines[kind])
    block_table = [7, 3, 9, 1, 5, 2, 8, 4, 6, 10, 11, 12, 13]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    prefix = len(ids) - 5
    runner.compute_logits([_scheduled(ids[:prefix], 0, block_table)])
    for pos in range(prefix, len(ids)):
        logits = runner.compute_logits([_scheduled([ids[pos]], pos, block_table)])
        torch.testing.assert_close(logits[0], expected[pos], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_identical_to_hf_generate(kind, tiny_models, engines):
    hf, tokenizer = _hf(tiny_models[kind])
    hf.generation_config.eos_token_id = None
    outputs = engines[kind].generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24,
                                                             ignore_eos=True))
    for prompt, output in zip(PROMPTS, outputs):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            expected = hf.generate(ids, max_new_tokens=24, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        assert output.outputs[0].token_ids == expected.tolist()
        assert output.outputs[0].finish_reason == "length"


def test_greedy_with_preemption_matches_unconstrained(tiny_models):
    """A KV cache too small for all sequences forces recompute-preemption; outputs unchanged."""
    path = str(tiny_models["llama-gqa-untied"])
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = PROMPTS * 3
    roomy = LLM(path, dtype="float32", kv_cache_memory_gb=0.02, block_size=4)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    # 3 layers * 2 kv heads * 16 dims * 2 (k, v) * 4 bytes * 4 tokens = 3 KiB per block.
    tight = LLM(path, dtype="float32", block_size=4, max_model_len=128,
                kv_cache_memory_gb=60 * 3072 / (1 << 30))
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params)]
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert got == expected


@pytest.mark.parametrize("kind", ["llama-gqa-untied", "gpt2"])
def test_prefix_caching_changes_nothing_but_work(kind, tiny_models):
    """Rows sharing a long prefix: identical greedy tokens with and without prefix caching, and
    the cached run really skipped the shared blocks."""
    shared = "Batch inference turns many prompts into many completions. " * 3
    prompts = [shared + tail for tail in ("Paris is", "The quick brown fox", "Once", "def add")]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    results = {}
    for caching in (False, True):
        llm = LLM(str(tiny_models[kind]), dtype="float32", kv_cache_memory_gb=0.02,
                  block_size=4, enable_prefix_caching=caching)
        results[caching] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        hits = llm.llm_engine.scheduler.block_manager.num_cached_token_hits
        assert (hits > 0) == caching
    assert results[True] == results[False]
