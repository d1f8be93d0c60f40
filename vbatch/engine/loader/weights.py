"""Read checkpoint tensors lazily, so each rank can load only its own slice of each weight.

A checkpoint directory holds `*.safetensors` files (optionally sharded, with a
`model.safetensors.index.json`). Tensors come back as "sliceables": a safetensors slice
(`get_slice`, nothing read until indexed) or, for pickle checkpoints that the user explicitly
allowed, a memory-mapped torch tensor. `shape_of`, `load_slice` and `load_full` accept both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from safetensors import safe_open

from vbatch.errors import VBatchUsageError

if TYPE_CHECKING:
    import torch

# A safetensors `PySafeSlice` or a `torch.Tensor`.
Sliceable = Union[Any, "torch.Tensor"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def safetensors_files(model_dir: Path) -> list[Path]:
    """Return the directory's safetensors weight files: the shards named by the index, else
    `*.safetensors`."""
    return _weight_files(Path(model_dir), SAFETENSORS_INDEX, (".safetensors",))


def pickle_files(model_dir: Path) -> list[Path]:
    """Return the directory's pickle weight files (`*.bin`, `*.pt`, `*.pth`, or the index's
    shards)."""
    return _weight_files(Path(model_dir), PICKLE_INDEX, PICKLE_SUFFIXES)


def iter_checkpoint_tensors(model_dir: Path) -> Iterator[tuple[str, Sliceable]]:
    """Yield `(hf_name, sliceable)` for every tensor of every weight file in `model_dir`.

    Safetensors files are used when present; only a directory without any is read from its
    pickle files (`torch.load(weights_only=True, mmap=True)`: no code runs, data is read lazily).
    Callers gate pickle checkpoints through `resolve_model(allow_pickle=...)`. Slices stay
    valid after the generator moves on. Raises `FileNotFoundError` when there are no weights.
    """
    model_dir = Path(model_dir)
    files = safetensors_files(model_dir)
    if files:
        for path in files:
            handle = safe_open(str(path), framework="pt")
            for name in handle.keys():
                yield name, handle.get_slice(name)
        return
    files = pickle_files(model_dir)
    if not files:
        raise FileNotFoundError(f"no *.safetensors (or pickle) weight files in {model_dir}")
    for path in files:
        yield from _load_pickle(path).items()


def shape_of(t: Sliceable) -> tuple[int, ...]:
    """Return the shape of a safetensors slice or a torch tensor without reading its data."""
    if hasattr(t, "get_shape"):
        return tuple(int(n) for n in t.get_shape())
    return tuple(int(n) for n in t.shape)


def load_slice(t: Sliceable, dim: int, start: int, length: int) -> torch.Tensor:
    """Return `t[..., start:start+length, ...]` along `dim`, reading only that range.

    The result is a fresh contiguous tensor in the checkpoint's dtype (it does not keep the
    rest of the tensor alive). Raises `IndexError` when the range is outside the tensor.
    """
    shape = shape_of(t)
    ndim = len(shape)
    if not -ndim <= dim < ndim:
        raise IndexError(f"dim {dim} out of range for a tensor of shape {shape}")
    dim %= ndim
    if start < 0 or length < 0 or start + length > shape[dim]:
        raise IndexError(f"range [{start}, {start + length}) outside dim {dim} of shape {shape}")
    if hasattr(t, "get_shape"):
        index = (slice(None),) * dim + (slice(start, start + length),)
        return t[index].contiguous()
    return t.narrow(dim, start, length).clone(memory_format=_contiguous())


def load_full(t: Sliceable) -> torch.Tensor:
    """Return the whole tensor as a torch tensor in the checkpoint's dtype."""
    if hasattr(t, "get_shape"):
        return t[...]
    return t.clone(memory_format=_contiguous())


def _weight_files(model_dir: Path, index_name: str, suffixes: tuple[str, ...]) -> list[Path]:
    """Return the shards listed in `index_name` if it exists, else the files with `suffixes`."""
    index = model_dir / index_name
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    return sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(suffixes))


def _load_pickle(path: Path) -> dict[str, Any]:
    """Load a pickle state dict with the restricted (weights-only) unpickler, mmap when possible."""
    import torch  # noqa: PLC0415 - start-up: keeps vbatch.engine.loader free of torch at import

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise VBatchUsageError(f"pickle checkpoint '{path}' does not hold a state dict")
    return {name: value for name, value in state.items() if hasattr(value, "narrow")}


def _contiguous() -> Any:
    """Return `torch.contiguous_format` (imported lazily to keep this module light)."""
    import torch  # noqa: PLC0415 - start-up: keeps vbatch.engine.loader free of torch at import

    return torch.contiguous_format
