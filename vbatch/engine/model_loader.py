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
