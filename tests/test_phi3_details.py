"""Phi-3 details beyond tests/test_architectures.py: longrope within
original_max_position_embeddings (the only range vbatch runs it in), a Phi-4-mini-like config
(longrope + partial rotary 0.75 + tied head + a sliding window), the refusal past the switch,
and the lazy fused-tensor views that split qkv_proj / gate_up_proj per tensor-parallel rank.

HF is the oracle (float32, eager attention): rotary tables (short factors times the longrope
attention factor), ragged prefill and paged-decode logits within 1e-4, greedy tokens equal to
HF `generate`, with native kernels and PyTorch ops (tp=2 and pp=2: test_architectures).
"""
from __future__ import annotations

import math

import pytest
import torch
from arch_checkpoints import LONGROPE_ORIGINAL_MAX, save_arch_checkpoint
from conftest import build_tokenizer, without_native_kernels
from transformers import AutoModelForCausalLM

from vbatch import LLM, SamplingParams
from vbatch.engine.models.loading import NarrowedView, split_fused
from vbatch.engine.sequence import ScheduledSequence

MODES = ["native-kernels", "torch-ops"]
TEXT = ("Batch inference turns many prompts into many completions. Paris is the capital of "
        "France; Berlin is the capital of Germany. zyxwvutsrq QJXZ kmvw pygj ~^|<> The quick "
        "brown fox jumps over the lazy dog. Once upon a time there was a small language model.")
PHI4_ORIGINAL, WINDOW, MAX_NEW = 64, 16, 12
# variant -> (max_model_len = original_max_position_embeddings, prefill lengths, greedy lengths)
VARIANTS = {"phi3-longrope": (LONGROPE_ORIGINAL_MAX, [3, 11, 20, 32], [2, 9, 20]),
            "phi4-mini-like": (PHI4_ORIGINAL, [3, 17, 40, 64], [2, 20, 52])}


def save_phi4_mini_like(path):
    """Phi-4-mini's shape of config, tiny: longrope (original 64 < max_position 512) with
    partial_rotary_factor 0.75 (12 of 16 head dims rotate; 6 factors per set), tied head,
    sliding window 16 on every layer; weights widened as in arch_checkpoints."""
    import transformers as tf

    tokenizer = build_tokenizer()
    generator = torch.Generator().manual_seed(5)
    short = (1.0 + torch.rand(6, generator=generator)).tolist()
    long = (2.0 + 6.0 * torch.rand(6, generator=generator)).tolist()
    config = tf.Phi3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        original_max_position_embeddings=PHI4_ORIGINAL, tie_word_embeddings=True,
        sliding_window=WINDOW, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.75, "short_factor": short,
                         "long_factor": long, "original_max_position_embeddings": PHI4_ORIGINAL})
    torch.manual_seed(3)
    model = tf.Phi3ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2) if param.dim() >= 2 else param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3-details")
    return {"phi3-longrope": save_arch_checkpoint(root / "longrope", "phi3-longrope"),
            "phi4-mini-like": save_phi4_mini_like(root / "phi4")}


def load_hf(path, **overrides):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager", **overrides)
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.fixture(scope="module")
def hf(models):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = load_hf(models[variant])
        return cache[variant]
    return get


@pytest.fixture(scope="module")
def engines(models):
    cache = {}

    def get(variant, mode):
        if (variant, mode) not in cache:
            with pytest.MonkeyPatch.context() as patch:
                if mode == "torch-ops":
                    without_native_kernels(patch)
                cache[variant, mode] = LLM(str(models[variant]), dtype="float32",
                                           kv_cache_memory_gb=0.01, block_size=4,
                                           max_model_len=VARIANTS[variant][0],
                                           enable_prefix_caching=False)
        return cache[variant, mode]
    yield get
    for llm in cache.values():
        llm.llm_engine.shutdown()


def token_ids(length: int) -> list[int]:
    ids = build_tokenizer().encode(TEXT)
    assert len(ids) >= 64
    return ids[:length]


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _scheduled(ids, start, block_table):
    return ScheduledSequence(seq_id=0, token_ids=ids, start_position=start,
                             block_table=block_table, temperature=0.0, top_p=1.0, top_k=0,
                             min_p=0.0, seed=0, row_key="k", output_index=0)


def _runner(llm):
    return llm.llm_engine.executor.worker.model_runner


def _greedy(llm, variant):
    prompts = [{"prompt_token_ids": token_ids(n)} for n in VARIANTS[variant][2]]
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


# --- fused checkpoint tensors -----------------------------------------------------------------

def test_narrowed_view_reads_only_its_part():
    full = torch.arange(7 * 5, dtype=torch.float32).view(7, 5)
    reads = []

    class Lazy:                         # a checkpoint tensor that records what it reads
        shape = full.shape

        def narrow(self, dim, start, length):
            reads.append((dim, start, length))
            return full.narrow(dim, start, length)

    view = NarrowedView(Lazy(), 0, 2, 4)
    assert view.shape == (4, 5)
    assert torch.equal(view.narrow(0, 1, 2), full[3:5])
    assert reads == [(0, 3, 2)]
    assert torch.equal(view.narrow(1, 1, 3), full[2:6, 1:4])
    assert torch.equal(NarrowedView(view, 1, 1, 3).narrow(0, 0, 4), full[2:6, 1:4])
    assert torch.equal(NarrowedView(full, 1, 3, 2).narrow(0, 5, 2), full[5:7, 3:5])
    for args in ((0, 3, 2), (0, -1, 1), (2, 0, 1)):
        with pytest.raises(ValueError):
            NarrowedView(view, *args).narrow(0, 0, 1)
    with pytest.raises(ValueError, match="out of range"):
        view.narrow(0, 3, 2)


def test_split_fused_names_and_checks_the_parts():
    fused = torch.arange(10 * 3, dtype=torch.float32).view(10, 3)
    name = "model.layers.1.self_attn.qkv_proj.weight"
    parts = split_fused(name, fused, "qkv_proj", [("q_proj", 6), ("k_proj", 2), ("v_proj", 2)])
    assert [n for n, _ in parts] == [name.replace("qkv_proj", p) for p in ("q_proj", "k_proj",
                                                                              "v_proj")]
    assert torch.equal(torch.cat([v.narrow(0, 0, v.shape[0]) for _, v in parts]), fused)
    with pytest.raises(ValueError, match="qkv_proj"):
        split_fused(name, fused, "qkv_proj", [("q_proj", 6), ("k_proj", 2), ("v_proj", 1)])


# --- the oracle: what these configs change in HF ---------------------------------------------

def test_hf_longrope_factors_window_and_tied_head_bite(models, hf):
    """Within the original length the short factors and the attention factor change HF's
    logits; the Phi-4-like config's window does past 16 tokens; its head is the embedding."""
    ids = token_ids(32)
    for variant in VARIANTS:
        model = hf(variant)
        rope = dict(model.config.rope_parameters)
        assert model.model.rotary_emb.attention_scaling > 1.05
        plain = load_hf(models[variant], rope_parameters={
            "rope_type": "default", "rope_theta": rope["rope_theta"],
            "partial_rotary_factor": rope.get("partial_rotary_factor", 1.0)})
        assert (hf_logits(model, ids) - hf_logits(plain, ids)).abs().max() > 1e-2, variant
    model = hf("phi4-mini-like")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    windowless = load_hf(models["phi4-mini-like"], sliding_window=None)
    ids = token_ids(40)
    with_window, without = hf_logits(model, ids), hf_logits(windowless, ids)
    torch.testing.assert_close(with_window[:WINDOW], without[:WINDOW], atol=1e-5, rtol=0)
    assert (with_window[WINDOW:] - without[WINDOW:]).abs().max() > 1e-2


# --- vbatch against HF ------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_refused_past_original_max_position_embeddings(variant, models):
    """By default the engine takes original_max_position_embeddings as max_model_len (not
    max_position_embeddings); asking for more is refused."""
    original = VARIANTS[variant][0]
    llm = LLM(str(models[variant]), dtype="float32", kv_cache_memory_gb=0.01)
    assert llm.llm_engine.max_model_len == original
    with pytest.raises(ValueError, match=f"longrope.*--max-model-len {original} or less"):
        LLM(str(models[variant]), dtype="float32", kv_cache_memory_gb=0.01,
            max_model_len=original + 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_rotary_tables_equal_hf(variant, mode, engines, hf):
    """cos/sin at every position up to max_model_len: HF's short factors, partial rotary
    dimension and longrope attention factor."""
    rotary = _runner(engines(variant, mode)).model.rotary_emb
    model = hf(variant)
    length = VARIANTS[variant][0]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32),
                                      torch.arange(length)[None])
    assert rotary.rotary_dim == cos.shape[-1] == (12 if variant == "phi4-mini-like" else 16)
    torch.testing.assert_close(rotary.cos[:length], cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(rotary.sin[:length], sin[0], atol=1e-6, rtol=0)
    assert math.isclose(rotary.cos[0, 0].item(), model.model.rotary_emb.attention_scaling,
                        rel_tol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_logits_match_hf_on_ragged_batch(variant, mode, engines, hf):
    model = hf(variant)
    prompts = [token_ids(n) for n in VARIANTS[variant][1]]
    seqs, next_block = [], 1
    for ids in prompts:
        num_blocks = -(-len(ids) // 4)
        seqs.append(_scheduled(ids, 0, list(range(next_block, next_block + num_blocks))[::-1]))
        next_block += num_blocks
    logits = _runner(engines(variant, mode)).compute_logits(seqs)
    offset = 0
    for ids in prompts:
        torch.testing.assert_close(logits[offset:offset + len(ids)], hf_logits(model, ids),
                                   atol=1e-4, rtol=0)
        offset += len(ids)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_logits_match_hf(variant, mode, engines, hf):
    """Prefill 6 tokens, then one token at a time through the paged cache up to max_model_len
    (past the Phi-4-like window)."""
    ids = token_ids(VARIANTS[variant][0])
    expected = hf_logits(hf(variant), ids)
    runner = _runner(engines(variant, mode))
    block_table = [7, 3, 9, 1, 5, 2, 8, 4, 6, 10, 14, 11, 16, 12, 13, 15]
    runner.compute_logits([_scheduled(ids[:6], 0, block_table)])
    for pos in range(6, len(ids)):
        logits = runner.compute_logits([_scheduled([ids[pos]], pos, block_table)])
        torch.testing.assert_close(logits[0], expected[pos], atol=1e-4, rtol=0,
                                   msg=lambda m, pos=pos: f"position {pos}: {m}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_identical_to_hf_generate(variant, mode, engines, hf):
    model = hf(variant)
    expected = []
    for n in VARIANTS[variant][2]:
        ids = torch.tensor([token_ids(n)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False,
                                 pad_token_id=model.config.pad_token_id)
        expected.append(out[0, n:].tolist())
    assert _greedy(engines(variant, mode), variant) == expected
