"""Start an engine's executor: the backend rule of `executor/backend.py` applied to what this
process sees (its CUDA GPUs, whether it runs in a Ray placement group, whether Ray imports)."""
from __future__ import annotations

import torch

from vbatch.engine.executor import backend as backend_rule
from vbatch.engine.executor.base import Executor
from vbatch.engine.executor.multiproc import MultiprocExecutor
from vbatch.engine.executor.uniproc import UniProcExecutor
from vbatch.engine.worker import WorkerSpec


def choose_backend(requested: str | None, *, world_size: int, device: torch.device) -> str:
    """The backend an engine of `world_size` ranks on `device` uses in this process:
    `backend.choose_backend` with this process's visible CUDA GPUs, placement group and Ray
    install. `LLMEngine` calls this before loading anything. Raises its ValueErrors."""
    return backend_rule.choose_backend(
        requested, world_size=world_size, device_type=device.type,
        num_visible_gpus=torch.cuda.device_count() if device.type == "cuda" else 0,
        in_placement_group=backend_rule.in_ray_placement_group(),
        ray_available=backend_rule.ray_is_available)


def make_executor(spec: WorkerSpec, *, tp_size: int, pp_size: int,
                  backend: str | None) -> Executor:
    """Start the tp_size x pp_size workers of one engine with the backend `choose_backend`
    picks for `backend` (an explicit name is checked and kept)."""
    chosen = choose_backend(backend, world_size=tp_size * pp_size,
                            device=torch.device(spec.device))
    if chosen == "uni":
        return UniProcExecutor(spec)
    if chosen == "mp":
        return MultiprocExecutor(spec, tp_size=tp_size, pp_size=pp_size)
    from vbatch.engine.executor.ray_executor import RayExecutor  # noqa: PLC0415 - lazy: ray backend only
    return RayExecutor(spec, tp_size=tp_size, pp_size=pp_size)
