"""What the new architectures cost: tok/s of a small Qwen3 and a small MoE against the LLaMA of
the same size, measured in the same run.

Models (random weights, built with transformers' own config classes and `save_pretrained` into
a temp dir; the tiny byte-level tokenizer of the tests, so the LM head is small and the
numbers are about the decoder):
  llama      hidden 576, 8 layers, 9 heads / 3 KV heads of 64, MLP 1536 (SmolLM2-135M's shape)
  qwen3      the same, plus q_norm/k_norm (per-head RMSNorm before rotary)
  qwen3_moe  the same attention, 8 experts of width 768, top-2 (the same active MLP width,
             2 x 768 = 1536, as the dense models), router softmax, renormalised
  mistral    the LLaMA with a sliding window of 64 on every layer (prompts of ~65 tokens +
             64 generated: the window acts on every decode step, over up to half the context)

Workload: 64 prompts of ~60 tokens, 64 greedy tokens each (EOS ignored), `vbatch.LLM` in one
process, bf16 on CPU (the native kernels). All four engines are built first; after a warm-up
they run in interleaved rounds (llama, qwen3, qwen3_moe, mistral, llama, ...; 3 by default)
and each keeps its fastest round, so machine drift affects all alike. tok/s = generated
tokens / wall time of `generate`. Prints a table, the CPU, and one JSON line last.

    python benchmarks/architectures.py [--num-prompts 64] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

SHAPE = dict(hidden_size=576, num_hidden_layers=8, num_attention_heads=9, num_key_value_heads=3,
             head_dim=64, max_position_embeddings=2048)


def build(kind: str, path: Path, tokenizer) -> Path:
    """Save a random checkpoint of `kind` (see module docstring) with the tiny tokenizer."""
    import torch
    import transformers as tf
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True, **SHAPE)
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(intermediate_size=1536, **common))
    elif kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(intermediate_size=1536,
                                                       sliding_window=64, **common))
    elif kind == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(intermediate_size=1536, **common))
    elif kind == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            intermediate_size=1536, moe_intermediate_size=768, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[], **common))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.05)
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def generate_tok_s(llm, prompts: list[str], max_tokens: int) -> float:
    """Generated tok/s of one `generate` over all prompts."""
    from vbatch import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from conftest import CORPUS, build_tokenizer
    from sampling_features import cpu_flags, cpu_name
    tokenizer = build_tokenizer()
    text = " ".join(CORPUS[:5])
    prompts = [f"{i}: {text[i % 40:][:260]}" for i in range(args.num_prompts)]
    from vbatch import LLM
    kinds = ("llama", "qwen3", "qwen3_moe", "mistral")
    results = dict.fromkeys(kinds, 0.0)
    with tempfile.TemporaryDirectory() as root:
        engines = {kind: LLM(str(build(kind, Path(root) / kind, tokenizer)), dtype="bfloat16",
                             kv_cache_memory_gb=1.0, max_model_len=512,
                             enable_prefix_caching=False) for kind in kinds}
        for llm in engines.values():                  # warm-up
            generate_tok_s(llm, prompts[:8], args.max_tokens)
        for _ in range(args.rounds):                  # interleaved, so drift hits all alike
            for kind, llm in engines.items():
                results[kind] = max(results[kind],
                                    generate_tok_s(llm, prompts, args.max_tokens))
    print(f"CPU: {cpu_name()} ({cpu_flags() or 'no AVX-512 BF16/VNNI, no AMX'})")
    print(f"{args.num_prompts} prompts x {args.max_tokens} greedy tokens, bf16")
    print(f"{'model':<11} {'tok/s':>8} {'vs llama':>9}")
    for kind, tok_s in results.items():
        print(f"{kind:<11} {tok_s:8.1f} {tok_s / results['llama']:9.3f}")
    print(json.dumps({"cpu": cpu_name(), "tok_s": {k: round(v, 1) for k, v in results.items()},
                      "ratio_vs_llama": {k: round(v / results["llama"], 3)
                                         for k, v in results.items()}}))


if __name__ == "__main__":
    main()
