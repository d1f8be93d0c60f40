"""Copying checkpoint tensors into a model's (possibly sharded, possibly fused) parameters.

A checkpoint name is first renamed to our module path; if it belongs to a fused parameter
(q_proj -> qkv_proj, gate_proj -> gate_up_proj) it is routed to that parameter with a shard id.
Each parameter's `weight_loader` (set by the parallel layers) takes only this rank's slice;
plain parameters (norms, biases of unsharded layers) are copied whole.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class StackedParam:
    """Checkpoint sub-name `checkpoint_name` lives in our fused `param_name` as `shard_id`."""

    param_name: str
    checkpoint_name: str
    shard_id: object


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    """Copy a whole (unsharded) tensor; shapes must match exactly."""
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, expected "
                         f"{tuple(param.shape)}")
    param.data.copy_(loaded.narrow(0, 0, loaded.shape[0]) if len(loaded.shape) else loaded)


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, object]],
                       rename: Callable[[str], str | None],
                       stacked_params: tuple[StackedParam, ...] = ()) -> set[str]:
    """Route every (checkpoint name, tensor) to its parameter; returns the parameters loaded.

    Raises ValueError if a checkpoint tensor has no home or a parameter is left unloaded, so a
    wrong checkpoint never produces silently wrong output.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_names: set[str] = set()
    for checkpoint_name, tensor in weights:
        name = rename(checkpoint_name)
        if name is None:
            continue
        shard_id = None
        for stacked in stacked_params:
            if f".{stacked.checkpoint_name}." in f".{name}":
                name = name.replace(stacked.checkpoint_name, stacked.param_name)
                shard_id = stacked.shard_id
                break
        param = params.get(name)
        if param is None:
            raise ValueError(f"checkpoint tensor {checkpoint_name!r} does not match any parameter "
                             f"of {type(model).__name__}")
        loader = getattr(param, "weight_loader", default_weight_loader)
        loader(param, tensor, shard_id) if shard_id is not None else loader(param, tensor)
        loaded_names.add(name)
    # Tied parameters appear under two names but are one tensor: loading either loads both.
    by_tensor: dict[int, list[str]] = {}
    for name, param in params.items():
        by_tensor.setdefault(id(param), []).append(name)
    missing = [names[0] for names in by_tensor.values() if not loaded_names.intersection(names)]
    if missing:
        raise ValueError(f"checkpoint is missing weights for: {', '.join(sorted(missing)[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    return loaded_names


class NarrowedView:
    """Rows (or columns) [start, start + length) along `dim` of a checkpoint tensor, still read
    lazily: a part of a fused checkpoint tensor (Phi-3's qkv_proj, gate_up_proj) seen as a
    tensor of its own, so the sharded loaders take their slice of each part and read only it.

    `inner` is anything with `.shape` and `.narrow(dim, start, length)` (a torch.Tensor, a
    lazy checkpoint tensor, another view)."""

    def __init__(self, inner, dim: int, start: int, length: int):
        shape = list(inner.shape)
        if not 0 <= dim < len(shape):
            raise ValueError(f"cannot narrow dimension {dim} of a tensor of shape {tuple(shape)}")
        if start < 0 or length < 0 or start + length > shape[dim]:
            raise ValueError(f"[{start}, {start + length}) is out of range for dimension {dim} "
                             f"of a tensor of shape {tuple(shape)}")
        self.inner, self.dim, self.start = inner, dim, start
        shape[dim] = length
        self.shape = tuple(shape)

    def narrow(self, dim: int, start: int, length: int):
        if start < 0 or length < 0 or start + length > self.shape[dim]:
            raise ValueError(f"[{start}, {start + length}) is out of range for dimension {dim} "
                             f"of a view of shape {self.shape}")
        if dim == self.dim:
            return self.inner.narrow(dim, self.start + start, length)
        # Read this part only, then the slice of the other dimension from it.
        return self.inner.narrow(self.dim, self.start, self.shape[self.dim]).narrow(
            dim, start, length)


def split_fused(name: str, tensor, fused: str, parts: list[tuple[str, int]], dim: int = 0):
    """(name, view) for each part of a fused checkpoint tensor: `fused` in `name` replaced by
    each part's name, the parts of the given sizes laid out one after another along `dim`.
    ValueError if the sizes do not add up to the tensor's."""
    total = sum(size for _, size in parts)
    if tuple(tensor.shape)[dim] != total:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}; expected "
                         f"{total} ({' + '.join(f'{p} {s}' for p, s in parts)}) along dimension "
                         f"{dim}")
    start, views = 0, []
    for part, size in parts:
        views.append((name.replace(fused, part), NarrowedView(tensor, dim, start, size)))
        start += size
    return views
