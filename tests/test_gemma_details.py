"""Gemma 2 / Gemma 3 details the shared architecture tests (test_architectures.py) leave out,
against Hugging Face on tiny random float32 checkpoints:

- a hidden size whose sqrt is not exact (72: sqrt = 8.485.., 8.5 in bf16), so the embedding
  scale's value and its rounding to the model dtype matter; q/k/v/o biases
  (`attention_bias`); an untied head (`tie_word_embeddings=False`);
- Gemma 3 as the larger real checkpoints are configured: linear RoPE scaling (factor 8) on the
  full_attention layers only, the local/global pattern from `sliding_window_pattern`, and
  final-logit soft-capping switched on;
- the bf16 embedding equals HF's bit for bit;
- what is refused (ValueError naming the field) and what is accepted.
"""
from __future__ import annotations

import pytest
import torch
from conftest import build_tokenizer, without_native_kernels
from transformers import AutoModelForCausalLM

from vbatch import LLM, SamplingParams
from vbatch.engine.models.registry import check_supported
from vbatch.engine.sequence import ScheduledSequence

HIDDEN = 72
PROMPTS = ["Paris is", "def add(a, b):\n    return a",
           "Batch inference turns many prompts into many completions. Paris is the capital of "
           "France; Berlin is the capital of Germany. zyxwvutsrq QJXZ kmvw pygj ~^|<>"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
VARIANTS = ["gemma2", "gemma3"]


def _config(arch: str, tokenizer, **overrides):
    import transformers as tf

    common = dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=96,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, max_position_embeddings=256, query_pre_attn_scalar=24,
                  sliding_window=16, attention_bias=True, tie_word_embeddings=False,
                  hidden_activation="gelu_pytorch_tanh", bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if arch == "gemma2":
        return tf.Gemma2Config(**{**common, "attn_logit_softcapping": 5.0,
                                  "final_logit_softcapping": 3.0, **overrides})
    return tf.Gemma3TextConfig(**{
        **common, "sliding_window_pattern": 2, "final_logit_softcapping": 3.0,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}},
        **overrides})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, object]:
    """arch -> a saved tiny checkpoint (weights widened, norms and biases off their init)."""
    import transformers as tf

    tokenizer = build_tokenizer()
    paths = {}
    for arch in VARIANTS:
        torch.manual_seed(0)
        cls = tf.Gemma2ForCausalLM if arch == "gemma2" else tf.Gemma3ForCausalLM
        model = cls(_config(arch, tokenizer))
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() >= 2:
                    param.normal_(0, 0.2)
                else:
                    param.add_(torch.randn_like(param) * 0.1)
        paths[arch] = tmp_path_factory.mktemp(arch)
        model.save_pretrained(paths[arch])
        tokenizer.save_pretrained(paths[arch])
    return paths


def _hf(path, dtype=torch.float32, **overrides):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager",
                                                 **overrides)
    model.generation_config.eos_token_id = None
    return model.eval()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _llm(path, mode="native-kernels", **kwargs):
    kwargs = {"dtype": "float32", "kv_cache_memory_gb": 0.01, "block_size": 4,
              "enable_prefix_caching": False, **kwargs}
    with pytest.MonkeyPatch.context() as patch:
        if mode == "torch-ops":
            without_native_kernels(patch)
        return LLM(str(path), **kwargs)


def _prefill_logits(llm, prompts: list[list[int]]) -> torch.Tensor:
    """One ragged prefill of every prompt (blocks handed out in reverse order)."""
    seqs, next_block = [], 1
    for i, ids in enumerate(prompts):
        blocks = list(range(next_block, next_block + -(-len(ids) // 4)))[::-1]
        next_block += len(blocks)
        seqs.append(ScheduledSequence(seq_id=i, token_ids=ids, start_position=0,
                                      block_table=blocks, temperature=0.0, top_p=1.0, top_k=0,
                                      min_p=0.0, seed=0, row_key=str(i), output_index=0))
    return llm.llm_engine.executor.worker.model_runner.compute_logits(seqs)


def _hf_greedy(model, tokenizer_ids):
    with torch.no_grad():
        out = model.generate(torch.tensor([tokenizer_ids]), max_new_tokens=GREEDY.max_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(tokenizer_ids):].tolist()


def test_hf_oracle_uses_the_features(checkpoints):
    """HF-side: the derived layer pattern alternates, and the linear RoPE scaling of the full
    layers and the final soft-cap change HF's logits (so matching them tests something)."""
    model = _hf(checkpoints["gemma3"])
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    ids = build_tokenizer().encode(PROMPTS[-1])
    logits = _hf_logits(model, ids)
    rope = model.config.rope_parameters
    unscaled = _hf(checkpoints["gemma3"], rope_parameters={
        **rope, "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    assert (_hf_logits(unscaled, ids) - logits).abs().max() > 1e-2
    uncapped = _hf(checkpoints["gemma3"], final_logit_softcapping=None)
    assert (_hf_logits(uncapped, ids) - logits).abs().max() > 1e-2
    assert torch.tensor(HIDDEN ** 0.5).to(torch.bfloat16).item() != HIDDEN ** 0.5


@pytest.mark.parametrize("mode", ["native-kernels", "torch-ops"])
@pytest.mark.parametrize("arch", VARIANTS)
def test_logits_and_greedy_match_hf(arch, mode, checkpoints):
    model, tokenizer = _hf(checkpoints[arch]), build_tokenizer()
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    llm = _llm(checkpoints[arch], mode)
    try:
        logits, offset = _prefill_logits(llm, prompts), 0
        for ids in prompts:
            torch.testing.assert_close(logits[offset:offset + len(ids)],
                                       _hf_logits(model, ids), atol=1e-4, rtol=0)
            offset += len(ids)
        outputs = llm.generate(PROMPTS, GREEDY)
        for ids, output in zip(prompts, outputs):
            assert output.outputs[0].token_ids == _hf_greedy(model, ids)
    finally:
        llm.llm_engine.shutdown()


def test_bf16_embedding_equals_hf_bit_for_bit(checkpoints):
    """sqrt(72) rounds to 8.5 in bf16 before the multiply, as HF's scaled embedding does."""
    model = _hf(checkpoints["gemma3"], dtype=torch.bfloat16)
    ids = torch.tensor(build_tokenizer().encode(PROMPTS[-1]))
    with torch.no_grad():
        expected = model.model.embed_tokens(ids[None])[0]
    unrounded = (model.model.embed_tokens.weight[ids].float() * HIDDEN ** 0.5).to(torch.bfloat16)
    assert not torch.equal(expected, unrounded)
    llm = _llm(checkpoints["gemma3"], dtype="bfloat16")
    try:
        ours = llm.llm_engine.executor.worker.model_runner.model
        assert torch.equal(ours.embed(ids, torch.arange(len(ids))), expected)
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.parametrize(("arch", "field", "value"), [
    ("gemma3", "attn_logit_softcapping", 50.0),
    ("gemma2", "hidden_activation", "gelu"),
    ("gemma2", "final_logit_softcapping", 0.0),
    ("gemma2", "attn_logit_softcapping", -1.0),
    ("gemma3", "use_bidirectional_attention", True),
])
def test_unimplemented_config_fields_are_refused(arch, field, value):
    config = _config(arch, build_tokenizer(), **{field: value})
    with pytest.raises(ValueError, match=field):
        check_supported(config, 256)


def test_real_configs_are_accepted_and_multimodal_gemma3_refused():
    import transformers as tf

    check_supported(tf.Gemma2Config(), 8192)
    check_supported(tf.Gemma3TextConfig(rope_scaling={"rope_type": "linear", "factor": 8.0}),
                    8192)
    with pytest.raises(ValueError, match="model_type 'gemma3'"):
        check_supported(tf.Gemma3Config(), 8192)


@pytest.mark.parametrize("native", [True, False], ids=["native-kernels", "torch-ops"])
def test_bf16_unit_offset_rms_norm_equals_hf_bit_for_bit(native, monkeypatch):
    """(1 + w) is kept in float32 and the output rounded once, as HF's Gemma2RMSNorm does (a
    bf16 1 + w moves about a third of the outputs by an ulp)."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    from vbatch.engine.layers.norm import RMSNorm
    if not native:
        without_native_kernels(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    hf = Gemma2RMSNorm(256, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(256, generator=gen) * 0.5)
    hf = hf.to(torch.bfloat16)
    ours = RMSNorm(256, 1e-6, torch.bfloat16, torch.device("cpu"), unit_offset=True)
    ours.weight.data.copy_(hf.weight.data)
    ours.process_weights_after_loading()
    x = torch.randn(33, 256, generator=gen).to(torch.bfloat16)
    residual = torch.randn(33, 256, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(x), hf(x))
        normed, summed = ours(x, residual.clone())
        assert torch.equal(summed, x + residual)
        assert torch.equal(normed, hf(x + residual))
