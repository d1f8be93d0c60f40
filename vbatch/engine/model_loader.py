"""Build our model class for a Hugging Face config and fill it from checkpoint files."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vbatch.engine.loader.weights import iter_checkpoint_tensors, load_slice, shape_of
from vbatch.engine.models.gpt2 import GPT2LMHeadModel
from vbatch.engine.models.llama import LlamaForCausalLM
from vbatch.parallel.state import ParallelState


def model_class_for(hf_config) -> type[nn.Module]:
    """The vbatch model implementing the config's architecture (ValueError if unsupported)."""
    by_model_type = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM,
                     "gpt2": GPT2LMHeadModel}
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in by_model_type:
        archs = ", ".join(getattr(hf_config, "architectures", None) or [str(model_type)])
        raise ValueError(f"unsupported model architecture {archs}: vbatch runs LLaMA-family "
                         "(llama, mistral) and GPT-2 models")
    return by_model_type[model_type]


def check_supported(hf_config, max_model_len: int) -> None:
    """Refuse, before any weight loads, a config whose math vbatch does not implement for this
    `max_model_len` (a wrong output is worse than a refusal); ValueError naming the field.

    `sliding_window` W (Mistral): each position attends to the last W positions only. Until
    the attention kernels implement the window, a model runs only where it cannot matter:
    max_model_len <= W (no position ever has more than W positions before it).
    """
    model_class_for(hf_config)
    model_type = getattr(hf_config, "model_type", None)
    window = getattr(hf_config, "sliding_window", None)
    if window is not None and getattr(hf_config, "use_sliding_window", True) \
            and window < max_model_len:
        raise ValueError(
            f"{model_type} config: sliding_window={window} is not implemented yet (positions "
            f"more than {window} tokens apart would attend to each other and the outputs would "
            f"differ from the model's); run with --max-model-len {window} or less, where the "
            f"window never applies")
    if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError(f"{model_type} config: scale_attn_by_inverse_layer_idx=True is not "
                         "implemented")


class CheckpointTensor:
    """A checkpoint tensor read lazily: `.shape`, and `.narrow()` reads only that slice."""

    def __init__(self, source):
        self.source = source
        self.shape = tuple(shape_of(source))

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return load_slice(self.source, dim, start, length)


def load_model(model_dir: Path, hf_config, ps: ParallelState, dtype: torch.dtype,
               max_position: int) -> nn.Module:
    """Instantiate the model on `ps.device` in `dtype` and load this rank's weight shards."""
    model_cls = model_class_for(hf_config)
    with torch.device(ps.device):
        model = model_cls(hf_config, ps, dtype, max_position)
    tensors = ((name, CheckpointTensor(source))
               for name, source in iter_checkpoint_tensors(Path(model_dir)))
    model.load_weights(tensors)
    for module in model.modules():          # CPU bf16: weights into oneDNN's layout, once
        if hasattr(module, "pack_weight"):
            module.pack_weight()
    return model.eval()
