"""Which vbatch model runs a Hugging Face config, and which configs are refused.

A wrong output is worse than a refusal: `check_supported` raises, before any weight loads, a
ValueError naming every config field whose math vbatch does not implement (for this
max_model_len). Fields are checked generically (any architecture) and per model class
(`refusals` of the class).
"""
from __future__ import annotations

import importlib

from torch import nn

from vbatch.engine.layers.rotary import rope_parameters

# model_type -> (module under vbatch.engine.models, class): imported on first use only.
MODEL_CLASSES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3_text": ("gemma3", "Gemma3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "mixtral": ("mixtral", "MixtralForCausalLM"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "gpt2": ("gpt2", "GPT2LMHeadModel"),
}

_ROPE_TYPES = {"default", "linear", "dynamic", "llama3", "yarn", "longrope"}


def model_class_for(hf_config) -> type[nn.Module]:
    """The vbatch model implementing the config's architecture (ValueError if unsupported)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in MODEL_CLASSES:
        archs = ", ".join(getattr(hf_config, "architectures", None) or [str(model_type)])
        raise ValueError(f"unsupported model architecture {archs} (model_type {model_type!r}); "
                         f"vbatch runs model types {', '.join(sorted(MODEL_CLASSES))}")
    module_name, class_name = MODEL_CLASSES[model_type]
    module = importlib.import_module(f"vbatch.engine.models.{module_name}")
    return getattr(module, class_name)


def _truthy(config, name: str) -> bool:
    return bool(getattr(config, name, None))


def longrope_original_length(hf_config) -> int | None:
    """original_max_position_embeddings of a longrope config (the longest context vbatch
    implements for it, see generic_refusals), else None."""
    for layer_type in sorted(set(getattr(hf_config, "layer_types", None) or ())) or [None]:
        try:
            params = rope_parameters(hf_config, layer_type)
        except ValueError:
            continue
        if params.get("rope_type") == "longrope":
            return (params.get("original_max_position_embeddings")
                    or getattr(hf_config, "original_max_position_embeddings", None))
    return None


def generic_refusals(hf_config, max_model_len: int) -> list[str]:
    """Config fields of any architecture that change the math and are not implemented."""
    refused = []
    if getattr(hf_config, "quantization_config", None):
        method = dict(hf_config.quantization_config).get("quant_method", "?")
        refused.append(f"quantization_config (quant_method={method!r}): quantized checkpoints "
                       "are not implemented; use a bf16/float32 checkpoint")
    for name in ("use_bidirectional_attention", "is_encoder_decoder"):
        if _truthy(hf_config, name):
            refused.append(f"{name}=True: vbatch runs causal decoders only")
    for name in ("scale_attn_by_inverse_layer_idx", "attention_sink", "sinks",
                 "use_attention_sinks", "attention_chunk_size", "no_rope_layers"):
        if _truthy(hf_config, name):
            refused.append(f"{name}={getattr(hf_config, name)!r} is not implemented")
    layer_types = set(getattr(hf_config, "layer_types", None) or ())
    unknown = layer_types - {"full_attention", "sliding_attention"}
    if unknown:
        refused.append(f"layer_types {sorted(unknown)} are not implemented")
    if getattr(hf_config, "num_attention_heads", None) is not None:
        types = sorted(layer_types) or [None]
        for layer_type in types:
            try:
                params = rope_parameters(hf_config, layer_type)
            except ValueError as error:
                refused.append(str(error))
                continue
            rope_type = params.get("rope_type")
            if rope_type not in _ROPE_TYPES:
                refused.append(f"rope_parameters rope_type={rope_type!r} is not implemented "
                               f"(implemented: {', '.join(sorted(_ROPE_TYPES))})")
            elif rope_type == "longrope":
                original = (params.get("original_max_position_embeddings")
                            or getattr(hf_config, "original_max_position_embeddings", None))
                if original and max_model_len > original:
                    refused.append(
                        f"rope_type 'longrope' past original_max_position_embeddings={original}:"
                        " Hugging Face switches every position of a sequence to the long "
                        "factors once it grows past that length, which a paged KV cache "
                        f"cannot reproduce; run with --max-model-len {original} or less")
    return refused


def check_supported(hf_config, max_model_len: int) -> None:
    """Refuse, before any weight loads, a config whose math vbatch does not implement for this
    `max_model_len`: one ValueError naming each offending field."""
    model_cls = model_class_for(hf_config)
    refused = generic_refusals(hf_config, max_model_len)
    refusals = getattr(model_cls, "refusals", None)
    if refusals is not None:
        refused += refusals(hf_config, max_model_len)
    if refused:
        model_type = getattr(hf_config, "model_type", None)
        raise ValueError(f"{model_type} config not supported: " + "; ".join(refused))
