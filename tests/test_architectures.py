"""The non-LLaMA architectures against Hugging Face transformers, on tiny random checkpoints
(float32; see arch_checkpoints for what each config exercises).

Proves, for Qwen2, Qwen3, Mistral, Gemma2, Gemma3, Phi3 (partial rotary), Mixtral and
Qwen3-MoE: prefill logits of a ragged batch (prompts of 2 to ~55 tokens) and paged-decode
logits (one token at a time, far past the sliding window) within 1e-4 of HF's forward
pass, and greedy generations token-identical to HF `generate`, with the native CPU kernels
and with PyTorch ops only; structured outputs, logprobs (equal to
HF's log_softmax) and n > 1 samples on each; tp=2 and pp=2 equal to HF too (slow).

The oracle is kept honest HF-side: the window really changes HF's logits past it (and not
before), Gemma2's soft-caps bite, Phi3's long factors apply past original_max_position_embeddings
and HF `generate` equals a cache-free greedy loop there (vbatch refuses longrope past that
length, see registry.py; test_phi3_details runs it within), and the MoE prompts route to several
experts in every sparse layer.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
from arch_checkpoints import (
    LONGROPE_ORIGINAL_MAX,
    MOE_ARCHS,
    VARIANTS,
    WINDOW,
    WINDOWED,
    save_arch_checkpoint,
)
from conftest import last_stage_logits, without_native_kernels
from transformers import AutoModelForCausalLM, AutoTokenizer

from vbatch import LLM, SamplingParams
from vbatch.engine.sequence import ScheduledSequence
from vbatch.engine.structured_output import StructuredOutputsParams

MODES = ["native-kernels", "torch-ops"]
# phi3-longrope's prompts cross original_max_position_embeddings, where HF switches the whole
# sequence to the long factors: vbatch refuses that (test_phi3_details runs longrope within it).
ENGINE_ARCHS = [arch for arch in VARIANTS if arch != "phi3-longrope"]
LONG = ("Batch inference turns many prompts into many completions. Paris is the capital of "
        "France; Berlin is the capital of Germany. zyxwvutsrq QJXZ kmvw pygj ~^|<>")
# Ragged: shorter than the window; shorter than the longrope switch but crossing it within 16
# new tokens; ~55 tokens (past both, by far).
PROMPTS = ["Paris is", "def add(a, b):\n    return a",
           "Once upon a time there was a small language model that liked numbers 0123456789. "
           "The quick brown fox", LONG]
MAX_NEW = 16
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
LABELS = ["positive", "negative", "neutral"]
REGEX = r"(yes|no) \d{1,3}"


@pytest.fixture(scope="session")
def arch_models(tmp_path_factory) -> dict[str, object]:
    """variant -> checkpoint directory, each built once per session."""
    root = tmp_path_factory.mktemp("arch-models")
    return {arch: save_arch_checkpoint(root / arch, arch) for arch in VARIANTS}


@pytest.fixture(scope="module")
def hf(arch_models):
    """hf(arch) -> (HF model in eager attention with EOS disabled, tokenizer), loaded once."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = load_hf(arch_models[arch])
            cache[arch][0].generation_config.eos_token_id = None
        return cache[arch]
    return get


@pytest.fixture(scope="module")
def hf_greedy(hf):
    """hf_greedy(arch) -> HF `generate`'s greedy new tokens for each of PROMPTS, computed once."""
    cache = {}

    def get(arch):
        if arch not in cache:
            model, tokenizer = hf(arch)
            cache[arch] = []
            for prompt in PROMPTS:
                ids = torch.tensor([tokenizer.encode(prompt)])
                with torch.no_grad():
                    out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
                cache[arch].append(out[0, ids.shape[1]:].tolist())
        return cache[arch]
    return get


@pytest.fixture(scope="module")
def engines(arch_models):
    """engines(arch, mode) -> a single-rank LLM, built once per module and kernel mode."""
    cache = {}

    def get(arch, mode):
        if (arch, mode) not in cache:
            with pytest.MonkeyPatch.context() as patch:
                if mode == "torch-ops":
                    without_native_kernels(patch)
                cache[arch, mode] = LLM(str(arch_models[arch]), dtype="float32",
                                        kv_cache_memory_gb=0.01, block_size=4,
                                        enable_prefix_caching=False)
        return cache[arch, mode]
    yield get
    for llm in cache.values():
        llm.llm_engine.shutdown()


def load_hf(path, **overrides):
    """HF's own model of the checkpoint at `path` (float32, eager attention: exact soft-capping
    and masks), config fields replaced by `overrides`; and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager", **overrides)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """HF's logits of a cache-free forward pass over `ids` (one row per position)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def hf_next_logits(model, ids: list[int], start: int) -> torch.Tensor:
    """Rows p >= start: HF's next-token logits after ids[:p + 1], as HF `generate` computes
    them at each step: for longrope (whose factor set depends on the length so far) each from
    its own cache-free forward pass; for the rest, rows of one causal forward over `ids`."""
    if model.config.rope_parameters.get("rope_type") != "longrope":
        return hf_logits(model, ids)[start:]
    return torch.stack([hf_logits(model, ids[:p + 1])[-1] for p in range(start, len(ids))])


def _scheduled(token_ids, start, block_table):
    return ScheduledSequence(seq_id=0, token_ids=token_ids, start_position=start,
                             block_table=block_table, temperature=0.0, top_p=1.0, top_k=0,
                             min_p=0.0, seed=0, row_key="k", output_index=0)


def _runner(llm):
    return llm.llm_engine.executor.worker.model_runner


def _greedy(llm) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


# --- the oracle itself (HF only) -------------------------------------------------------------

def test_prompts_cross_the_window_and_the_longrope_switch(hf):
    for arch in ("mistral", "qwen2"):     # Qwen2's own tokenizer class splits digits apart
        _, tokenizer = hf(arch)
        lengths = [len(tokenizer.encode(p)) for p in PROMPTS]
        assert lengths[0] < WINDOW < lengths[-1] and 50 <= lengths[-1] <= 64, lengths
        assert lengths[2] <= LONGROPE_ORIGINAL_MAX < lengths[2] + MAX_NEW, lengths
        assert lengths[-1] > LONGROPE_ORIGINAL_MAX


@pytest.mark.parametrize("arch", WINDOWED)
def test_hf_applies_the_sliding_window(arch, arch_models, hf):
    """Positions before the window's reach equal a window-less model's; past it they differ."""
    model, tokenizer = hf(arch)
    ids = tokenizer.encode(LONG)
    windowless, _ = load_hf(arch_models[arch], sliding_window=4096)
    with_window, without = hf_logits(model, ids), hf_logits(windowless, ids)
    torch.testing.assert_close(with_window[:WINDOW], without[:WINDOW], atol=1e-5, rtol=0)
    assert (with_window[WINDOW:] - without[WINDOW:]).abs().max() > 1e-2


def test_hf_gemma2_softcaps_bite(arch_models, hf):
    model, tokenizer = hf("gemma2")
    ids = tokenizer.encode(LONG)
    logits = hf_logits(model, ids)
    assert logits.abs().max() < 3.0                      # final_logit_softcapping
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        uncapped, _ = load_hf(arch_models["gemma2"], **{field: None})
        assert (hf_logits(uncapped, ids) - logits).abs().max() > 1e-2, field


def test_hf_longrope_switches_factor_sets_by_length(arch_models, hf):
    """A forward pass over <= original_max_position_embeddings tokens uses the short factors,
    a longer one the long factors at every position; HF `generate` (which drops its cache at
    the switch) equals a cache-free greedy loop."""
    model, tokenizer = hf("phi3-longrope")
    rope = dict(model.config.rope_parameters)
    short_only, _ = load_hf(arch_models["phi3-longrope"],
                            rope_parameters={**rope, "long_factor": rope["short_factor"]})
    ids = tokenizer.encode(LONG)
    short_ids = ids[:LONGROPE_ORIGINAL_MAX]
    torch.testing.assert_close(hf_logits(model, short_ids), hf_logits(short_only, short_ids),
                               atol=1e-6, rtol=0)
    assert (hf_logits(model, ids) - hf_logits(short_only, ids))[:8].abs().max() > 1e-2
    prompt = tokenizer.encode(PROMPTS[2])
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id)
    loop = list(prompt)
    for _ in range(MAX_NEW):
        loop.append(int(hf_logits(model, loop)[-1].argmax()))
    assert generated[0].tolist() == loop


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_prompts_route_to_several_experts(arch, hf):
    """HF's routers pick more than one distinct expert per sparse layer over the prompts, and
    the top-2 choice is not degenerate (several distinct expert pairs)."""
    model, tokenizer = hf(arch)
    choices: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        if name.endswith(".gate") and "experts" not in name:
            def record(_module, _args, output, name=name):
                choices.setdefault(name, []).append(output[2].reshape(-1, output[2].shape[-1]))
            hooks.append(module.register_forward_hook(record))
    try:
        for prompt in PROMPTS:
            hf_logits(model, tokenizer.encode(prompt))
    finally:
        for hook in hooks:
            hook.remove()
    sparse_layers = 4 if arch == "mixtral" else 3          # qwen3_moe: layer 0 is dense
    assert len(choices) == sparse_layers
    for name, picks in choices.items():
        picks = torch.cat(picks)
        assert picks.shape[-1] == 2
        assert len(picks.unique()) > 2, name
        assert len({tuple(sorted(row)) for row in picks.tolist()}) > 1, name


# --- vbatch against HF ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ENGINE_ARCHS)
def test_engine_runs_the_backend_it_names(arch, mode, engines):
    layers = _runner(engines(arch, mode)).model.attention_layers()
    assert len(layers) == 4
    assert all((layer.kernels is not None) == (mode == "native-kernels") for layer in layers)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ENGINE_ARCHS)
def test_prefill_logits_match_hf_on_ragged_batch(arch, mode, engines, hf):
    model, tokenizer = hf(arch)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    seqs, next_block = [], 1          # block 0 is the null block
    for ids in prompts:
        num_blocks = -(-len(ids) // 4)
        seqs.append(_scheduled(ids, 0, list(range(next_block, next_block + num_blocks))[::-1]))
        next_block += num_blocks
    logits = _runner(engines(arch, mode)).compute_logits(seqs)
    assert logits.shape == (sum(map(len, prompts)), model.config.vocab_size)
    offset = 0
    for ids in prompts:
        torch.testing.assert_close(logits[offset:offset + len(ids)], hf_logits(model, ids),
                                   atol=1e-4, rtol=0)
        offset += len(ids)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ENGINE_ARCHS)
def test_decode_logits_match_hf(arch, mode, engines, hf):
    """Prefill 12 tokens, then feed the rest one at a time through the paged KV cache, past
    the window (16)."""
    model, tokenizer = hf(arch)
    ids = tokenizer.encode(LONG)
    runner = _runner(engines(arch, mode))
    block_table = [7, 3, 9, 1, 5, 2, 8, 4, 6, 10, 14, 11, 16, 12, 13, 15]
    prefix = 12
    expected = hf_next_logits(model, ids, prefix)
    runner.compute_logits([_scheduled(ids[:prefix], 0, block_table)])
    for pos in range(prefix, len(ids)):
        logits = runner.compute_logits([_scheduled([ids[pos]], pos, block_table)])
        torch.testing.assert_close(logits[0], expected[pos - prefix], atol=1e-4, rtol=0,
                                   msg=lambda m, pos=pos: f"position {pos}: {m}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ENGINE_ARCHS)
def test_greedy_generation_identical_to_hf_generate(arch, mode, engines, hf_greedy):
    outputs = engines(arch, mode).generate(PROMPTS, GREEDY)
    for prompt, output, expected in zip(PROMPTS, outputs, hf_greedy(arch)):
        assert output.outputs[0].token_ids == expected, prompt
        assert output.outputs[0].finish_reason == "length"


def _check_logprobs(model, prompt_ids, completion, num_top):
    """Every generated token's logprob, rank and top-`num_top` alternatives equal HF's
    log_softmax of its next-token logits for the history before it."""
    ids = prompt_ids + completion.token_ids
    expected = torch.log_softmax(hf_next_logits(model, ids[:-1], len(prompt_ids) - 1), dim=-1)
    assert len(completion.token_logprobs) == len(completion.token_ids)
    for row, token_id, entry in zip(expected, completion.token_ids, completion.token_logprobs):
        assert entry.token_id == token_id
        assert math.isclose(entry.logprob, row[token_id].item(), abs_tol=1e-4)
        assert entry.rank == int((row >= row[token_id]).sum())
        values = [top.logprob for top in entry.top_logprobs]
        assert values == pytest.approx(row.topk(num_top).values.tolist(), abs=1e-4)
        for top in entry.top_logprobs:
            assert math.isclose(top.logprob, row[top.token_id].item(), abs_tol=1e-4)


@pytest.mark.parametrize("arch", ENGINE_ARCHS)
def test_structured_outputs_logprobs_and_samples(arch, engines, hf):
    llm = engines(arch, "native-kernels")
    model, _ = hf(arch)
    rows = [f"Row {i}: {p}" for i, p in enumerate(PROMPTS)]
    # Structured outputs: sampled rows all end with their grammar.
    for constraint, check in ((StructuredOutputsParams(choice=LABELS), LABELS.__contains__),
                              (StructuredOutputsParams(regex=REGEX),
                               lambda text: re.fullmatch(REGEX, text))):
        params = SamplingParams(temperature=1.0, seed=7, max_tokens=40,
                                structured_outputs=constraint)
        for output in llm.generate(rows, params):
            completion = output.outputs[0]
            assert completion.finish_reason == "stop" and check(completion.text), completion
    # Logprobs: sampled tokens past the window / the longrope switch.
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True, logprobs=3)
    for output in llm.generate(PROMPTS, params):
        _check_logprobs(model, output.prompt_token_ids, output.outputs[0], 3)
    # n samples forked from one prefill: distinct, each its own history's logprobs.
    params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True,
                            logprobs=1)
    for output in llm.generate(PROMPTS[2:], params):
        assert [c.index for c in output.outputs] == [0, 1, 2]
        assert len({tuple(c.token_ids) for c in output.outputs}) > 1
        for completion in output.outputs:
            _check_logprobs(model, output.prompt_token_ids, completion, 1)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
@pytest.mark.parametrize("arch", ENGINE_ARCHS)
def test_tp2_and_pp2_match_hf(arch, layout, arch_models, hf, hf_greedy, monkeypatch):
    """tp=2 splits the 4 query / 2 KV heads (and the experts' FFNs), its ranks on the native
    kernels; pp=2 gives each stage 2 layers (for gemma3: [sliding, full] | [sliding, sliding]),
    its ranks on PyTorch ops only (VBATCH_CPU_KERNELS=0, inherited by the worker processes)."""
    expected = hf_greedy(arch)
    model, tokenizer = hf(arch)
    ids = tokenizer.encode(LONG)
    expected_logits = hf_logits(model, ids)
    tp, pp = layout
    if pp > 1:
        monkeypatch.setenv("VBATCH_CPU_KERNELS", "0")
    llm = LLM(str(arch_models[arch]), dtype="float32", kv_cache_memory_gb=0.01,
              tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        native = llm.llm_engine.executor.collective_rpc("uses_native_kernels")
        assert all(native) == (pp == 1) and any(native) == (pp == 1), native
        assert _greedy(llm) == expected
        torch.testing.assert_close(last_stage_logits(llm, ids), expected_logits, atol=1e-4,
                                   rtol=0)           # HF's own logits, directly
    finally:
        llm.llm_engine.shutdown()
