"""Which executor runs an engine's ranks: vLLM's `distributed_executor_backend` rule, decided
in one place for the engine (`executor/factory.py`, live values) and the job plan
(`jobs/plan.py`, the values each replica's engine will see).

- a backend asked for is used as asked, if it can run: `uni` only for tp x pp = 1, and `mp`
  for tp x pp > 1 on CUDA only with tp x pp GPUs visible on this node;
- none asked for: `uni` for tp x pp = 1; else `ray` inside a Ray placement group (a task or
  actor scheduled in one) or when the ranks need more GPUs than this node shows (if Ray is
  installed; if not, that is an error); `mp` in every other case, including every CPU-only
  machine (tp x pp CPU processes).

Light on purpose: no torch, and Ray is never imported here (the CLI imports the plan).
"""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable

BACKENDS = ("uni", "mp", "ray")


def ray_is_available() -> bool:
    """True if Ray can be imported (it is an optional extra: `pip install 'vbatch[ray]'`)."""
    return importlib.util.find_spec("ray") is not None


def in_ray_placement_group() -> bool:
    """True inside a Ray task/actor scheduled in a placement group (Ray is never imported
    here if the process has not imported it already)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    from ray.util import get_current_placement_group  # noqa: PLC0415 - optional; ray already imported
    return get_current_placement_group() is not None


def choose_backend(requested: str | None, *, world_size: int, device_type: str,
                   num_visible_gpus: int, in_placement_group: bool,
                   ray_available: Callable[[], bool]) -> str:
    """The backend ("uni", "mp" or "ray") for an engine of `world_size` ranks on `device_type`
    ("cuda", "cpu", ...) in a process that sees `num_visible_gpus` CUDA GPUs, by the rule in
    the module docstring. `ray_available` is called at most once, only when the answer depends
    on it. Pure: same arguments, same answer.

    Raises ValueError (one line) for an unknown name, `uni` with world_size > 1, and, for
    world_size > 1 on CUDA with fewer visible GPUs than world_size, `mp` (or no backend asked
    for and no Ray installed). A single rank is never refused here: its device is torch's.
    """
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"distributed_executor_backend must be one of "
                         f"{', '.join(BACKENDS)}; got {requested!r}")
    if requested == "uni" and world_size > 1:
        raise ValueError("distributed_executor_backend='uni' runs a single rank; use 'mp' or "
                         f"'ray' for tensor_parallel_size x pipeline_parallel_size = "
                         f"{world_size}")
    too_few_gpus = device_type == "cuda" and num_visible_gpus < world_size
    if requested is None:
        if world_size == 1:
            return "uni"
        if in_placement_group:
            return "ray"
        if not too_few_gpus:
            return "mp"
        if ray_available():
            return "ray"
    elif requested == "ray" or world_size == 1 or not too_few_gpus:
        return requested
    raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {world_size} "
                     f"needs {world_size} GPUs; {num_visible_gpus} visible "
                     "on this node (use the ray executor for several nodes)")
