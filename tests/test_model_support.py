"""Configs whose math vbatch does not implement are refused before any weight loads, naming
the field; where the missing feature cannot matter, the model runs and equals Hugging Face.

Mistral's `sliding_window` W: refused when max_model_len > W (positions farther apart than W
would attend to each other); with max_model_len <= W the window never applies, and greedy
output equals HF's own Mistral (which applies it).
"""
from __future__ import annotations

import pytest
import torch
from conftest import build_tokenizer

from vbatch import LLM, SamplingParams

WINDOW = 24


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    from transformers import MistralConfig, MistralForCausalLM
    path = tmp_path_factory.mktemp("mistral")
    tokenizer = build_tokenizer()
    torch.manual_seed(3)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, sliding_window=WINDOW,
                           bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    model = MistralForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model.eval(), tokenizer


def test_sliding_window_beyond_max_model_len_is_refused(tiny_mistral):
    path, _, _ = tiny_mistral
    with pytest.raises(ValueError, match=f"sliding_window={WINDOW} is not implemented.*"
                                         f"--max-model-len {WINDOW}"):
        LLM(str(path), dtype="float32", kv_cache_memory_gb=0.01)


def test_sliding_window_within_max_model_len_equals_hf(tiny_mistral):
    path, hf, tokenizer = tiny_mistral
    llm = LLM(str(path), dtype="float32", kv_cache_memory_gb=0.01, max_model_len=WINDOW)
    try:
        prompt = "The quick brown fox"
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        room = WINDOW - ids.shape[1]
        [output] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=room,
                                                         ignore_eos=True))
        with torch.no_grad():
            expected = hf.generate(ids, max_new_tokens=room, do_sample=False,
                                   min_new_tokens=room, pad_token_id=0)[0, ids.shape[1]:]
        assert output.outputs[0].token_ids == expected.tolist()
    finally:
        llm.llm_engine.shutdown()


def test_a_job_on_such_a_model_exits_2_in_one_line(tiny_mistral, tmp_path):
    import subprocess

    from conftest import vbatch_command, write_prompt_jsonl
    path, _, _ = tiny_mistral
    source = tmp_path / "p.jsonl"
    write_prompt_jsonl(source, 3)
    result = subprocess.run([*vbatch_command(), "run", str(source), "--model", str(path),
                             "--output", str(tmp_path / "out"), "--max-tokens", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "sliding_window" in lines[0]
