"""Configs whose math vbatch does not implement are refused before any weight loads, naming
the field (registry.check_supported); a job on such a model exits 2 with one line.

The refusals are checked on transformers' own config classes; the end-to-end cases use a
tiny random checkpoint with a refused config.
"""
from __future__ import annotations

import pytest
from conftest import build_tokenizer
from transformers import GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, T5Config

from vbatch import LLM
from vbatch.engine.models.registry import check_supported, model_class_for


def _llama(**overrides):
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, **overrides)


@pytest.mark.parametrize("config, field", [
    (_llama(quantization_config={"quant_method": "gptq", "bits": 4}), "quantization_config"),
    (GPT2Config(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (_llama(attention_chunk_size=64), "attention_chunk_size"),
])
def test_unimplemented_fields_are_refused_by_name(config, field):
    with pytest.raises(ValueError, match=field):
        check_supported(config, 256)


def test_unknown_layer_type_is_refused():
    config = Qwen2Config(num_hidden_layers=2)
    config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(ValueError, match="chunked_attention"):
        check_supported(config, 256)


def test_longrope_is_refused_only_past_the_original_context():
    rotary_half = 8
    config = Phi3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=2, max_position_embeddings=256,
                        original_max_position_embeddings=32,
                        rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * rotary_half,
                                      "long_factor": [2.0] * rotary_half})
    check_supported(config, 32)
    with pytest.raises(ValueError, match="longrope.*--max-model-len 32"):
        check_supported(config, 33)


def test_supported_configs_pass():
    for config in (_llama(), MistralConfig(sliding_window=16), Qwen2Config(), GPT2Config()):
        check_supported(config, 4096)


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"unsupported model architecture.*qwen3_moe"):
        model_class_for(T5Config())


@pytest.fixture(scope="module")
def refused_model(tmp_path_factory):
    """A tiny random LLaMA checkpoint whose config asks for chunked attention (Llama 4's
    `attention_chunk_size`, which vbatch does not implement)."""
    from transformers import LlamaForCausalLM
    path = tmp_path_factory.mktemp("refused")
    tokenizer = build_tokenizer()
    config = _llama(vocab_size=len(tokenizer), attention_chunk_size=8)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_llm_refuses_before_loading_weights(refused_model):
    with pytest.raises(ValueError, match="attention_chunk_size=8 is not implemented"):
        LLM(str(refused_model), dtype="float32", kv_cache_memory_gb=0.01)


def test_a_job_on_such_a_model_exits_2_in_one_line(refused_model, tmp_path):
    import subprocess

    from conftest import vbatch_command, write_prompt_jsonl
    source = tmp_path / "p.jsonl"
    write_prompt_jsonl(source, 3)
    result = subprocess.run([*vbatch_command(), "run", str(source), "--model",
                             str(refused_model), "--output", str(tmp_path / "out"),
                             "--max-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "attention_chunk_size" in lines[0]


def test_dynamic_ntk_rope_runs_as_hf_within_max_position_embeddings(tmp_path):
    """Dynamic NTK scaling changes HF's frequencies only past max_position_embeddings, which
    max_model_len cannot exceed: within it, vbatch's greedy tokens equal HF `generate`."""
    import torch
    from transformers import LlamaForCausalLM

    from vbatch import SamplingParams
    tokenizer = build_tokenizer()
    torch.manual_seed(5)
    config = _llama(vocab_size=len(tokenizer), max_position_embeddings=64,
                    rope_scaling={"rope_type": "dynamic", "factor": 4.0},
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.2)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompt = "Paris is the capital of France; Berlin is the capital of Germany. 0123456789"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    new_tokens = 64 - ids.shape[1]
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01)
    [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=new_tokens,
                                                  ignore_eos=True))
    with torch.no_grad():
        expected = model.eval().generate(ids, max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, do_sample=False,
                                         pad_token_id=0)[0, ids.shape[1]:]
    assert out.outputs[0].token_ids == expected.tolist()
    with pytest.raises(ValueError, match="exceeds the model's maximum of 64"):
        LLM(str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01, max_model_len=65)
