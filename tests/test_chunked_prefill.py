"""Chunked prefill and mixed decode + prefill steps against Hugging Face `generate` (float32).

Token budgets of 1, 7 and 64 per step, with prompts longer than the budget, rows arriving while
others decode, prefix caching on (a chunked prompt shared by later rows) and prompt logprobs
(never chunked): greedy tokens identical to HF's, on the native CPU kernels and on PyTorch ops.
"""
from __future__ import annotations

import pytest
import torch
from conftest import without_native_kernels
from transformers import AutoModelForCausalLM, AutoTokenizer

from vbatch import LLM, SamplingParams

LONG = "Once upon a time there was a small language model that liked numbers 0123456789. " * 4
PROMPTS = ["The quick brown fox", LONG, "Paris is", LONG + "It counted",
           "def add(a, b):\n    return a"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def hf_greedy(tiny_models):
    """HF's greedy continuation of every prompt (token ids)."""
    path = tiny_models["llama-gqa-untied"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        expected.append(out[0, ids.shape[1]:].tolist())
    return expected


def _engine(tiny_models, budget: int) -> LLM:
    return LLM(str(tiny_models["llama-gqa-untied"]), dtype="float32", kv_cache_memory_gb=0.02,
               block_size=4, max_num_batched_tokens=budget)


@pytest.mark.parametrize("kernels", ["native", "torch-ops"])
@pytest.mark.parametrize("budget", [1, 7, 64])
def test_greedy_equals_hf_at_every_chunk_size(budget, kernels, tiny_models, hf_greedy):
    with pytest.MonkeyPatch.context() as patch:
        if kernels == "torch-ops":
            without_native_kernels(patch)
        llm = _engine(tiny_models, budget)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompt_lens = [len(llm.get_tokenizer().encode(p)) for p in PROMPTS]
    assert max(prompt_lens) > budget                 # some prompt really is chunked
    outputs = llm.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy


def test_rows_arriving_while_others_decode_are_mixed_into_their_steps(tiny_models, hf_greedy):
    """Requests added between steps join the running decodes in the same step, and every
    output equals HF's."""
    llm = _engine(tiny_models, 16)
    engine = llm.llm_engine
    steps = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        steps.append([seq.has_prefilled for seq in out.seqs])
        return out

    engine.scheduler.schedule = recording_schedule
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    finished = {}
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{index}", engine.encode_prompt(prompt), params)
        for output in engine.step():
            finished[output.request_id] = output.outputs[0].token_ids
    while engine.has_unfinished_requests():
        for output in engine.step():
            finished[output.request_id] = output.outputs[0].token_ids
    mixed = [kinds for kinds in steps if any(kinds) and not all(kinds)]
    assert len(mixed) >= len(PROMPTS) - 1
    assert [finished[f"r{i}"] for i in range(len(PROMPTS))] == hf_greedy


def test_chunked_prompt_shared_by_later_rows_with_prefix_caching(tiny_models, hf_greedy):
    """A long prompt prefilled in chunks, then rows with the same prefix that hit its cached
    blocks: same tokens as HF, and the cache was hit."""
    llm = _engine(tiny_models, 8)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    first = llm.generate([PROMPTS[1]], params)[0].outputs[0].token_ids
    again = llm.generate([PROMPTS[3], PROMPTS[1]], params)
    assert llm.llm_engine.scheduler.block_manager.num_cached_token_hits > 0
    assert first == hf_greedy[1]
    assert [o.outputs[0].token_ids for o in again] == [hf_greedy[3], hf_greedy[1]]


def test_prompt_logprobs_are_computed_in_one_step_beside_chunked_rows(tiny_models):
    """Prompt logprobs under a budget that fits one long prompt at a time equal those under a
    roomy one; a prompt-logprobs prompt longer than the budget is refused."""
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0, ignore_eos=True)
    roomy_engine = _engine(tiny_models, 4096)
    roomy = roomy_engine.generate(PROMPTS, params)
    longest = max(len(o.prompt_token_ids) for o in roomy)
    tight = _engine(tiny_models, longest + 1).generate(PROMPTS, params)   # one prompt a step
    for a, b in zip(roomy, tight):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        got = [None if e is None else e.logprob for e in b.prompt_token_logprobs]
        want = [None if e is None else e.logprob for e in a.prompt_token_logprobs]
        assert got == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        _engine(tiny_models, longest - 1).generate(PROMPTS, params)


def test_a_6000_token_prompt_under_a_1024_token_budget_equals_hf(tmp_path):
    """The issue's case: a 6,000-token prompt with max_num_batched_tokens=1024 (six chunks),
    beside short prompts that decode while it is prefilled: greedy tokens identical to HF's."""
    from conftest import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.2)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, len(tokenizer), (n,), generator=generator).tolist()
               for n in (6000, 5, 40)]
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_memory_gb=0.05,
              max_num_batched_tokens=1024)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, output in zip(prompts, outputs):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                      pad_token_id=tokenizer.pad_token_id)
        assert output.outputs[0].token_ids == expected[0, len(prompt):].tolist()
