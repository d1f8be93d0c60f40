"""Which executor runs an engine's ranks: vLLM's `distributed_executor_backend` rule.

- tp x pp = 1 and no backend asked for: `uni` (the worker lives in the engine's process);
- `mp` / `ray` when asked for explicitly;
- otherwise `ray` when this process runs inside a Ray placement group (a Ray Data replica
  actor, say) or the job needs more GPUs than this node has; `mp` in every other case,
  including every CPU-only machine (tp x pp CPU processes).
"""
from __future__ import annotations

import sys

import torch

from vbatch.engine.executor.base import Executor
from vbatch.engine.worker import WorkerSpec

BACKENDS = ("uni", "mp", "ray")


def ray_is_available() -> bool:
    """True if Ray can be imported (it is an optional extra: `pip install 'vbatch[ray]'`)."""
    import importlib.util
    return importlib.util.find_spec("ray") is not None


def in_ray_placement_group() -> bool:
    """True inside a Ray task/actor scheduled in a placement group (Ray is never imported
    here if the process has not imported it already)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    from ray.util import get_current_placement_group
    return get_current_placement_group() is not None


def choose_backend(requested: str | None, *, world_size: int, device: torch.device) -> str:
    """The backend to use (see module docstring). Raises ValueError for an unknown name."""
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of "
                             f"{', '.join(BACKENDS)}; got {requested!r}")
        if requested == "uni" and world_size > 1:
            raise ValueError("distributed_executor_backend='uni' runs a single rank; use 'mp' or "
                             f"'ray' for tensor_parallel_size x pipeline_parallel_size = "
                             f"{world_size}")
        return requested
    if world_size == 1:
        return "uni"
    if in_ray_placement_group():
        return "ray"
    if device.type == "cuda" and torch.cuda.device_count() < world_size:
        return "ray"
    return "mp"


def make_executor(spec: WorkerSpec, *, tp_size: int, pp_size: int,
                  backend: str | None) -> Executor:
    """Start the tp_size x pp_size workers of one engine with the chosen backend."""
    chosen = choose_backend(backend, world_size=tp_size * pp_size,
                            device=torch.device(spec.device))
    if chosen == "uni":
        from vbatch.engine.executor.uniproc import UniProcExecutor
        return UniProcExecutor(spec)
    if chosen == "mp":
        from vbatch.engine.executor.multiproc import MultiprocExecutor
        return MultiprocExecutor(spec, tp_size=tp_size, pp_size=pp_size)
    from vbatch.engine.executor.ray_executor import RayExecutor
    return RayExecutor(spec, tp_size=tp_size, pp_size=pp_size)
