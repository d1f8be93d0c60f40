"""Model loading front door: resolve a `--model` string to a local directory, read its tensors.

`resolve_model` turns a path, a `.gguf` file, an alias (`smollm2`, `llama`) or a hub id into a
`ResolvedModel` (a Hugging Face-style directory on local disk); `iter_checkpoint_tensors`,
`shape_of`, `load_slice` and `load_full` read that directory's weights lazily, slice by slice.
"""

from __future__ import annotations

from vbatch.engine.loader.gguf_convert import CONVERTER_VERSION, convert_gguf
from vbatch.engine.loader.resolve import (
    ResolvedModel,
    cache_root_dir,
    default_model_file,
    resolve_model,
)
from vbatch.engine.loader.weights import (
    Sliceable,
    iter_checkpoint_tensors,
    load_full,
    load_slice,
    shape_of,
)

__all__ = [
    "CONVERTER_VERSION",
    "ResolvedModel",
    "Sliceable",
    "cache_root_dir",
    "convert_gguf",
    "default_model_file",
    "iter_checkpoint_tensors",
    "load_full",
    "load_slice",
    "resolve_model",
    "shape_of",
]
