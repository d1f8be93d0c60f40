"""Every architecture on CUDA equals the CPU engine, with attention through the Triton paged
kernel and through the PyTorch path (SDPA or the float32 matmul path with the sliding-window
mask and softcaps), the MoE's sparse expert loop: greedy tokens identical and prompt logprobs
within 1e-3, float32 with TF32 off."""
from __future__ import annotations

import pytest
import torch
from arch_checkpoints import ARCHS, save_arch_checkpoint

from vbatch import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = ["Paris is", "Batch inference turns many prompts into many completions. Paris is the "
           "capital of France; Berlin is the capital of Germany. 0123456789 zyxwvu"]


def _run(path, device):
    llm = LLM(str(path), dtype="float32", device=device, kv_cache_memory_gb=0.01)
    try:
        return llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24,
                                                    ignore_eos=True, prompt_logprobs=0))
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.parametrize("triton", ["1", "0"], ids=["triton", "torch-ops"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_matches_cpu(arch, triton, tmp_path, monkeypatch):
    monkeypatch.setenv("VBATCH_TRITON_ATTENTION", triton)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    path = save_arch_checkpoint(tmp_path / arch, arch)
    cpu, gpu = _run(path, "cpu"), _run(path, "cuda")
    for on_cpu, on_gpu in zip(cpu, gpu):
        assert on_gpu.outputs[0].token_ids == on_cpu.outputs[0].token_ids
        for entry_cpu, entry_gpu, token in zip(on_cpu.prompt_logprobs[1:],
                                               on_gpu.prompt_logprobs[1:],
                                               on_cpu.prompt_token_ids[1:]):
            assert abs(entry_gpu[token].logprob - entry_cpu[token].logprob) < 1e-3
