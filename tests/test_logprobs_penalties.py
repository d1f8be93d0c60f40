"""Logprobs, prompt logprobs and penalties, checked against Hugging Face's own model.

Tiny random checkpoints in float32: every logprob the engine returns must equal HF's
log_softmax of its own logits (within 1e-4), ranks must equal the count of tokens at least as
likely, and greedy decoding with a repetition penalty must give HF generate()'s tokens; with
tp=3 and pp=2 the results must equal tp=1's.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import save_tp3_llama

from vbatch import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "Paris is the capital of", "def add(a, b):"]


def _hf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm_and_hf(tiny_models, request):
    kind = request.param
    llm = LLM(str(tiny_models[kind]), dtype="float32", kv_cache_memory_gb=0.01)
    yield llm, _hf(tiny_models[kind])
    llm.llm_engine.shutdown()


def _hf_logprobs(hf, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _check_entry(entry, expected_row: torch.Tensor, token_id: int, num_top: int):
    assert entry.token_id == token_id
    assert math.isclose(entry.logprob, expected_row[token_id].item(), abs_tol=1e-4)
    assert entry.rank == int((expected_row >= expected_row[token_id]).sum())
    assert len(entry.top_logprobs) == num_top
    values = [top.logprob for top in entry.top_logprobs]
    assert values == sorted(values, reverse=True)
    expected_top = expected_row.topk(num_top).values.tolist()
    assert values == pytest.approx(expected_top, abs=1e-4)
    for top in entry.top_logprobs:
        assert math.isclose(top.logprob, expected_row[top.token_id].item(), abs_tol=1e-4)


@pytest.mark.parametrize("llm_and_hf", ["llama-gqa-untied", "gpt2"], indirect=True)
def test_logprobs_and_prompt_logprobs_equal_hf(llm_and_hf):
    llm, hf = llm_and_hf
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True,
                            logprobs=3, prompt_logprobs=2)
    for output in llm.generate(PROMPTS, params):
        completion = output.outputs[0]
        ids = output.prompt_token_ids + completion.token_ids
        expected = _hf_logprobs(hf, ids)
        num_prompt = len(output.prompt_token_ids)
        assert output.prompt_token_logprobs[0] is None
        assert len(output.prompt_token_logprobs) == num_prompt
        for position in range(1, num_prompt):
            _check_entry(output.prompt_token_logprobs[position], expected[position - 1],
                         ids[position], 2)
        assert len(completion.token_logprobs) == len(completion.token_ids)
        for i, entry in enumerate(completion.token_logprobs):
            _check_entry(entry, expected[num_prompt + i - 1], completion.token_ids[i], 3)
        total = sum(entry.logprob for entry in completion.token_logprobs)
        assert math.isclose(completion.cumulative_logprob, total, abs_tol=1e-6)
        # vLLM's shapes: the token itself first, then the alternatives by rank.
        first = completion.logprobs[0]
        assert next(iter(first)) == completion.token_ids[0]
        assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == num_prompt


@pytest.mark.parametrize("llm_and_hf", ["llama-gqa-tied"], indirect=True)
def test_continuation_loglikelihood_from_prompt_logprobs(llm_and_hf):
    """Sum of a continuation's prompt logprobs = HF's log p(continuation | context), also when
    the context is already in the prefix cache (the request recomputes its prompt)."""
    llm, hf = llm_and_hf
    tokenizer = llm.get_tokenizer()
    context = "Once upon a time there was a small language model that liked numbers"
    continuations = [" 0123", " dogs.", " Paris"]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    llm.generate([context + " warm-up"], SamplingParams(max_tokens=1))  # fill the prefix cache
    context_ids = tokenizer.encode(context)
    for continuation in continuations:
        ids = context_ids + tokenizer.encode(continuation, add_special_tokens=False)
        output = llm.generate([{"prompt_token_ids": ids}], params)[0]
        ours = sum(e.logprob for e in output.prompt_token_logprobs[len(context_ids):])
        expected = _hf_logprobs(hf, ids)
        theirs = sum(expected[p - 1, ids[p]].item() for p in range(len(context_ids), len(ids)))
        assert math.isclose(ours, theirs, abs_tol=1e-4)
        assert all(e.top_logprobs == [] for e in output.prompt_token_logprobs[1:])


def test_long_prompt_logprobs_are_chunked(tiny_models, monkeypatch):
    """A prompt longer than the chunk of positions scored at once gives the same values."""
    import vbatch.engine.logprobs as logprobs_module
    llm = LLM(str(tiny_models["llama-gqa-untied"]), dtype="float32", kv_cache_memory_gb=0.01)
    try:
        ids = llm.get_tokenizer().encode(" ".join(["The quick brown fox jumps"] * 12))
        params = SamplingParams(max_tokens=1, prompt_logprobs=1)
        whole = llm.generate([{"prompt_token_ids": ids}], params)[0].prompt_token_logprobs
        monkeypatch.setattr(logprobs_module, "PROMPT_CHUNK", 7)
        chunked = llm.generate([{"prompt_token_ids": ids}], params)[0].prompt_token_logprobs
    finally:
        llm.llm_engine.shutdown()
    assert len(ids) > 3 * 7
    assert [e and (e.token_id, round(e.logprob, 5), e.rank) for e in whole] == \
        [e and (e.token_id, round(e.logprob, 5), e.rank) for e in chunked]


@pytest.mark.parametrize("kind", ["llama-gqa-untied", "gpt2"])
def test_repetition_penalty_matches_hf_generate(tiny_models, kind):
    llm = LLM(str(tiny_models[kind]), dtype="float32", kv_cache_memory_gb=0.01)
    hf = _hf(tiny_models[kind])
    try:
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12,
                                                       ignore_eos=True, repetition_penalty=1.3))
    finally:
        llm.llm_engine.shutdown()
    for output in outputs:
        ids = torch.tensor([output.prompt_token_ids])
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=12, min_new_tokens=12,
                                   repetition_penalty=1.3, pad_token_id=0)
        assert output.outputs[0].token_ids == expected[0, ids.shape[1]:].tolist()


def _reference_penalised_greedy(hf, prompt_ids, steps, presence, frequency):
    """Greedy decoding with presence/frequency penalties over the generated tokens only,
    computed independently with HF's forward."""
    ids = list(prompt_ids)
    for _ in range(steps):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(ids[len(prompt_ids):], dtype=torch.long),
                                minlength=logits.shape[0]).float()
        logits = logits - frequency * counts - presence * (counts > 0).float()
        ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):]


def test_presence_and_frequency_penalties(tiny_models):
    path = tiny_models["llama-gqa-tied"]
    llm = LLM(str(path), dtype="float32", kv_cache_memory_gb=0.01)
    hf = _hf(path)
    try:
        plain = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10,
                                                     ignore_eos=True))
        params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                 presence_penalty=p, frequency_penalty=f)
                  for p, f in ((1.5, 0.0), (0.0, 1.2), (0.5, 2.0))]
        outputs = llm.generate(PROMPTS, params)
    finally:
        llm.llm_engine.shutdown()
    changed = 0
    for output, before, p in zip(outputs, plain, params):
        expected = _reference_penalised_greedy(hf, output.prompt_token_ids, 10,
                                               p.presence_penalty, p.frequency_penalty)
        assert output.outputs[0].token_ids == expected
        changed += output.outputs[0].token_ids != before.outputs[0].token_ids
    assert changed, "the penalties never changed a greedy output: the test proves nothing"


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 3},
                                      {"pipeline_parallel_size": 2}])
def test_logprobs_penalties_and_samples_equal_across_tp_pp(tmp_path_factory, parallel):
    path = save_tp3_llama(tmp_path_factory.mktemp("tp3-llama"))
    params = SamplingParams(temperature=0.9, seed=5, max_tokens=6, ignore_eos=True, n=2,
                            logprobs=2, prompt_logprobs=1, repetition_penalty=1.2,
                            frequency_penalty=0.3)

    def run(**sizes):
        llm = LLM(str(path), dtype="float32", kv_cache_memory_gb=0.01, **sizes)
        try:
            return llm.generate(PROMPTS, params)
        finally:
            llm.llm_engine.shutdown()

    def digest(outputs):
        """Token ids and ranks (exact), logprobs (separately, within 1e-4)."""
        ids, values = [], []
        for output in outputs:
            entries = output.prompt_token_logprobs[1:]
            for completion in output.outputs:
                ids.append(completion.token_ids)
                entries = entries + completion.token_logprobs
            ids.append([(e.token_id, e.rank, [t.token_id for t in e.top_logprobs])
                        for e in entries])
            values += [e.logprob for e in entries]
        return ids, values

    (ids, values), (expected_ids, expected_values) = digest(run(**parallel)), digest(run())
    assert ids == expected_ids
    assert values == pytest.approx(expected_values, abs=1e-4)


@pytest.fixture(params=["native", "torch"])
def logprob_path(request, monkeypatch):
    """Run a test with the native CPU kernel's statistics and with the PyTorch ops'."""
    from vbatch.engine import logprobs
    if request.param == "torch":
        monkeypatch.setattr(logprobs, "cpu_kernels_for", lambda device, dtype: None)
    elif logprobs.cpu_kernels_for(torch.device("cpu"), torch.float32) is None:
        pytest.skip("native CPU kernels unavailable")
    return request.param


@pytest.mark.parametrize("vocab", [1, 5, 16, 300, 4099])
def test_logprob_stats_equal_log_softmax_and_a_stable_sort(vocab, logprob_path):
    """Top entries (ids and values; the lower id first among ties, as a stable sort orders
    them) and the normaliser equal torch's log_softmax, for float32 and bf16 rows."""
    from vbatch.engine.logprobs import LogprobStats
    torch.manual_seed(vocab)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(7, vocab) * 4).to(dtype)
        logits[:, vocab // 2:] = logits[:, :1]                  # many ties, some at the top
        logits[3] = -1e4                                        # a flat row
        probe = min(8, vocab)
        stats = LogprobStats.of(logits, 8)
        expected = torch.log_softmax(logits.float(), dim=-1)
        values, ids = expected.sort(dim=1, descending=True, stable=True)
        assert torch.allclose(stats.top_logprobs, values[:, :probe], atol=1e-5)
        if logprob_path == "native":       # torch.topk orders tied entries its own way
            assert stats.top_ids.tolist() == ids[:, :probe].tolist()
        rebuilt = (logits.float() - stats.maxima.unsqueeze(1)) - stats.log_sums.unsqueeze(1)
        assert torch.allclose(rebuilt, expected, atol=1e-5)


def test_logprob_stats_of_a_row_with_nan(logprob_path):
    """A NaN never enters the top entries and makes the row's normaliser NaN (as it makes
    log_softmax's output); other rows are unaffected."""
    from vbatch.engine.logprobs import LogprobStats
    logits = torch.arange(40, dtype=torch.float32).reshape(2, 20)
    logits[0, 19] = float("nan")
    stats = LogprobStats.of(logits, 3)
    assert math.isnan(stats.log_sums[0].item()) and not math.isnan(stats.log_sums[1].item())
    if logprob_path == "native":
        assert stats.top_ids[0].tolist() == [18, 17, 16]
    assert stats.top_ids[1].tolist() == [19, 18, 17]


def test_ranks_inside_and_outside_the_probed_top_entries(logprob_path):
    """Ranks equal a full count whether the token is among the probed top entries or not,
    with ties, for bf16 and float32 logits."""
    from vbatch.engine.logprobs import RANK_PROBE, SampledLogprobs
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(64, 300).to(dtype)
        logits[:, 10:20] = logits[:, 10:11]                   # ties
        order = logits.float().argsort(dim=1, descending=True)
        picks = [0, 1, RANK_PROBE - 1, RANK_PROBE, RANK_PROBE + 1, 150, 299]
        tokens = torch.stack([order[r, picks[r % len(picks)]] for r in range(64)])
        tokens[::9] = 10                                      # a tied token
        table = SampledLogprobs(logits, 3)
        entries = table.entries(tokens, [r % 4 for r in range(64)])
        full = torch.log_softmax(logits.float(), dim=-1)
        for r, entry in enumerate(entries):
            value = full[r, tokens[r]]
            assert entry.rank == int((full[r] >= value).sum())
            assert entry.logprob == pytest.approx(value.item(), abs=1e-6)
            assert entry.top_logprobs == pytest.approx(full[r].topk(r % 4).values.tolist(),
                                                       abs=1e-6)
