"""Tiny random checkpoints of the non-LLaMA architectures, built with transformers' own config
classes and saved with `save_pretrained` plus the tiny tokenizer of conftest.

Every config is tiny (hidden 64, 4 layers so a pp=2 split gives each stage 2, 4 query / 2 KV
heads so tp=2 splits them, float32) and turns on what its architecture does differently from
LLaMA, at sizes where it acts on ~60-token prompts:

- qwen2: q/k/v biases; a vocabulary padded past the tokenizer (len(tokenizer) + 12 rows);
  `use_sliding_window` with `max_window_layers=1`: HF 5.x derives
  `layer_types = ["full_attention"] + ["sliding_attention"] * 3` (layer i slides iff
  i >= max_window_layers) and saves that list in config.json; window 16.
- qwen3: q_norm / k_norm (per-head RMSNorm before rope), head_dim 32 != hidden / heads = 16,
  no biases, tied embeddings.
- mistral: sliding window 16 on every layer, head_dim 32 given explicitly.
- gemma2: window 16 on the even layers (HF's default `layer_types`: sliding, full, sliding,
  full), attention and final logit soft-capping small enough to bite (5.0 / 3.0),
  query_pre_attn_scalar 24 != head_dim 32, gelu_pytorch_tanh, (1 + w) RMSNorms, sqrt(hidden)
  embedding scale, tied head, pre/post-feedforward norms.
- gemma3 (Gemma3TextConfig -> Gemma3ForCausalLM): q/k norms, window 16 with the explicit
  non-periodic `layer_types` [sliding, full, sliding, sliding] (a stage that indexed the
  pattern by its local layer index would get layer 3 wrong under pp=2), rope base 10 000 on
  sliding layers and 1 000 000 on full ones (`rope_parameters` keyed by layer type in 5.x).
- phi3: fused qkv_proj / gate_up_proj, partial rotary (`partial_rotary_factor` 0.5: rope on the
  first 8 of 16 head dims, the rest passed through).
- phi3-longrope: `longrope` rope scaling (short and long factor lists of length head_dim / 2),
  original_max_position_embeddings 32 < max_position_embeddings 256, so the attention factor
  is sqrt(1 + ln(256/32) / ln 32) ~= 1.27 and prompts cross the switch point. What HF does:
  each forward pass picks ONE factor set for all its positions from
  seq_len = max(position_ids) + 1: long factors if seq_len > 32, short factors otherwise
  (`dynamic_rope_update` / `longrope_frequency_update` in modeling_rope_utils). So a
  40-token prompt's forward uses long factors even at positions 0..31, and a 20-token prompt
  uses short ones. In `generate`, Phi3ForCausalLM.prepare_inputs_for_generation drops the KV
  cache on the first step whose total length reaches 33 (past_length <= 32), recomputing the
  whole sequence with long factors; afterwards it decodes with long factors. Net effect: the
  logits at every step equal a cache-free forward of the whole sequence so far, i.e. once a
  sequence is longer than 32 tokens all of its keys are rotated with the long factors. An
  engine that keeps short-factor keys cached past the switch differs from HF there. The
  attention factor (~1.27, from max_position_embeddings / original) multiplies cos and sin at
  EVERY length, short factors included (it is computed once at init, only inv_freq switches).
- mixtral: 4 experts, top-2 routing (softmax over all experts, then top-2 renormalised),
  sliding window 16 on every layer.
- qwen3_moe: 4 experts, top-2 with norm_topk_prob, moe_intermediate_size 32, layer 0 dense
  (mlp_only_layers [0], intermediate 128), q/k norms, head_dim 32.
- llama: the LLaMA control, built the same way (not one of ARCHS).

Sliding-window semantics in HF 5.x (masking_utils.sliding_window_overlay, shared by Qwen2,
Mistral, Mixtral, Gemma2 and Gemma3): query position q sees key positions k with
q - W < k <= q, i.e. the W most recent tokens including itself.

Weights: normal(0, 0.2) for every >= 2-D parameter (as conftest), and normal(0, 0.1) added to
every 1-D one, so biases (zero at init) and norm weights (ones, or zeros for Gemma's 1 + w)
differ from their defaults and a wrong load of any of them shows in the logits.
"""
from __future__ import annotations

from pathlib import Path

ARCHS = ["qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe"]
VARIANTS = [*ARCHS, "phi3-longrope"]
MOE_ARCHS = ["mixtral", "qwen3_moe"]
WINDOW = 16
# Architectures whose config applies a sliding window to at least one layer.
WINDOWED = ["qwen2", "mistral", "gemma2", "gemma3", "mixtral"]
LONGROPE_ORIGINAL_MAX = 32


def _common(tokenizer) -> dict:
    return {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def build_arch_model(arch: str, tokenizer, *, seed: int = 0):
    """The HF model (random, widened weights, eval mode) of `arch` for `tokenizer`."""
    import torch
    import transformers as tf

    common = _common(tokenizer)
    if arch == "llama":
        config = tf.LlamaConfig(**common)
        cls = tf.LlamaForCausalLM
    elif arch == "qwen2":
        config = tf.Qwen2Config(**{**common, "vocab_size": len(tokenizer) + 12},
                                use_sliding_window=True, sliding_window=WINDOW,
                                max_window_layers=1, tie_word_embeddings=False)
        cls = tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        config = tf.Qwen3Config(**common, head_dim=32, attention_bias=False,
                                tie_word_embeddings=True)
        cls = tf.Qwen3ForCausalLM
    elif arch == "mistral":
        config = tf.MistralConfig(**common, head_dim=32, sliding_window=WINDOW)
        cls = tf.MistralForCausalLM
    elif arch == "gemma2":
        config = tf.Gemma2Config(**common, head_dim=32, query_pre_attn_scalar=24,
                                 sliding_window=WINDOW, attn_logit_softcapping=5.0,
                                 final_logit_softcapping=3.0,
                                 hidden_activation="gelu_pytorch_tanh")
        cls = tf.Gemma2ForCausalLM
    elif arch == "gemma3":
        config = tf.Gemma3TextConfig(
            **common, head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention",
                         "sliding_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                             "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
            hidden_activation="gelu_pytorch_tanh")
        cls = tf.Gemma3ForCausalLM
    elif arch == "phi3":
        config = tf.Phi3Config(**common, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
        cls = tf.Phi3ForCausalLM
    elif arch == "phi3-longrope":
        half = 64 // 4 // 2                              # head_dim / 2 factors
        generator = torch.Generator().manual_seed(seed + 1)
        short = (1.0 + torch.rand(half, generator=generator)).tolist()
        long = (2.0 + 6.0 * torch.rand(half, generator=generator)).tolist()
        config = tf.Phi3Config(
            **common, original_max_position_embeddings=LONGROPE_ORIGINAL_MAX,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                             "short_factor": short, "long_factor": long,
                             "original_max_position_embeddings": LONGROPE_ORIGINAL_MAX})
        cls = tf.Phi3ForCausalLM
    elif arch == "mixtral":
        config = tf.MixtralConfig(**{**common, "intermediate_size": 64}, num_local_experts=4,
                                  num_experts_per_tok=2, sliding_window=WINDOW)
        cls = tf.MixtralForCausalLM
    elif arch == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**common, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                   norm_topk_prob=True, moe_intermediate_size=32,
                                   decoder_sparse_step=1, mlp_only_layers=[0],
                                   tie_word_embeddings=False)
        cls = tf.Qwen3MoeForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r}")
    torch.manual_seed(seed)
    model = cls(config)
    # Random init is small; widen the weights so greedy decoding is not degenerate, and move
    # biases and norm weights off their init values so their loading is tested.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.2)
            else:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def save_arch_checkpoint(path: Path, arch: str, *, seed: int = 0) -> Path:
    """Save a tiny random HF checkpoint of `arch` (one of VARIANTS, or "llama") and the tiny
    tokenizer to `path`; returns `path`."""
    from conftest import build_tokenizer

    tokenizer = build_tokenizer()
    model = build_arch_model(arch, tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
