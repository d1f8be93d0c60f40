"""The engine with its attention on the Triton paged kernel equals Hugging Face's `generate`.

No GPU here: the kernel runs in Triton's interpreter on CPU tensors (`TRITON_INTERPRET=1`, in
a subprocess so the rest of the suite imports triton normally), wired into every attention
layer exactly as a CUDA cache wires it (`PagedAttention.triton`). Ragged prompts, a prompt
longer than the step's token budget (chunked prefill) and decodes mixed into its steps; LLaMA
with GQA, Mistral (a sliding window on every layer) and Gemma 2 (alternating windows, logit
softcaps): greedy tokens identical to HF's in float32.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from arch_checkpoints import save_arch_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = ["The quick brown fox", "Paris is the capital of France; Berlin is the capital of",
           "def add(a, b):\n    return a"]
MAX_TOKENS = 6

SCRIPT = textwrap.dedent("""
    import json, sys
    from vbatch import LLM, SamplingParams
    from vbatch.engine.kernels import triton_attention
    paths, prompts, max_tokens = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    results = []
    for path in paths:
        llm = LLM(path, dtype="float32", kv_cache_memory_gb=0.01, block_size=4,
                  max_num_batched_tokens=12)
        for layer in llm.llm_engine.executor.worker.model_runner.model.attention_layers():
            layer.triton = triton_attention
        results.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("triton-archs")
    return [str(tiny_models["llama-gqa-untied"])] + [
        str(save_arch_checkpoint(root / arch, arch)) for arch in ("mistral", "gemma2")]


def test_engine_on_the_triton_kernel_equals_hf(checkpoints):
    env = {**os.environ, "TRITON_INTERPRET": "1", "VBATCH_CPU_KERNELS": "0"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(checkpoints),
                             json.dumps(PROMPTS), str(MAX_TOKENS)], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for path, outputs in zip(checkpoints, got):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        for prompt, tokens in zip(PROMPTS, outputs):
            ids = torch.tensor([tokenizer.encode(prompt)])
            with torch.no_grad():
                expected = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False,
                                          eos_token_id=None,
                                          pad_token_id=tokenizer.pad_token_id)
            assert tokens == expected[0, ids.shape[1]:].tolist(), path
