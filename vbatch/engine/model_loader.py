"""Build our model class for a Hugging Face config and fill it from checkpoint files."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vbatch.engine.kernels.cpu_kernels import cpu_kernels
from vbatch.engine.loader.weights import iter_checkpoint_tensors, load_slice, shape_of
from vbatch.engine.models.registry import model_class_for
from vbatch.parallel.int8_linear import check_int8_supported
from vbatch.parallel.state import ParallelState


class CheckpointTensor:
    """A checkpoint tensor read lazily: `.shape`, and `.narrow()` reads only that slice."""

    def __init__(self, source):
        self.source = source
        self.shape = tuple(shape_of(source))

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return load_slice(self.source, dim, start, length)


def load_model(model_dir: Path, hf_config, ps: ParallelState, dtype: torch.dtype,
               max_position: int, quantization: str | None = None) -> nn.Module:
    """Instantiate the model on `ps.device` in `dtype` and load this rank's weight shards.

    `quantization="int8"`: each linear layer then replaces its own shard by int8 weights
    (parallel/int8_linear.py; the LM head and MoE experts stay in `dtype`); ValueError where
    the device cannot run it."""
    if quantization is not None:
        check_int8_supported(ps.device)
    model_cls = model_class_for(hf_config)
    with torch.device(ps.device):
        model = model_cls(hf_config, ps, dtype, max_position)
    tensors = ((name, CheckpointTensor(source))
               for name, source in iter_checkpoint_tensors(Path(model_dir)))
    model.load_weights(tensors)
    kernels = cpu_kernels() if quantization is not None else None
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
        if quantization is not None and hasattr(module, "quantize_weight"):
            module.quantize_weight(quantization, kernels)
        elif hasattr(module, "pack_weight"):  # CPU bf16: weights into oneDNN's layout, once
            module.pack_weight()
    return model.eval()
