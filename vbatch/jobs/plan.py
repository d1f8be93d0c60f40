"""The job plan: resources -> R replicas x (tp x pp) devices, the executor, and the runner.

A replica is one `LLMEngine` over its own group of tp x pp devices (its ranks). The plan decides:

- **replicas**: `--replicas` when given, else as many as fit (GPUs // (tp x pp)) on a GPU
  machine, 1 on a CPU machine (one engine already uses every core).
- **runner**: `local` (replica processes on this node) or `ray` (Ray Data actors). `auto` picks
  `ray` when Ray is importable and a cluster address is set (`--ray-address` / `RAY_ADDRESS`) or
  the job needs more GPUs than this node has; otherwise `local`. Ray is imported only when the
  answer depends on it.
- **executor**: how one replica runs its ranks (`uni`, `mp` or `ray`): the engine's own rule,
  `engine/executor/backend.py`, applied to where that replica's engine will run: in this
  process for the one-local-replica fast path (this node's GPUs, this process's placement
  group), in a spawned replica process (its device group, no placement group), or in a Ray
  Data replica actor (the tp x pp GPUs it reserves, no placement group).
- **device groups** (local runner on GPUs): replica r gets GPUs [r*w, (r+1)*w) of this node (w =
  tp x pp), named as `CUDA_VISIBLE_DEVICES` ids. On CPUs ranks are processes, not devices. On
  Ray each replica actor reserves w GPUs (or w CPUs) for its local rank processes and Ray
  places it; with the `ray` executor its ranks are Ray actors in the engine's own placement
  group of w bundles instead, and the replica actor reserves nothing.

`make_plan` raises `VBatchUsageError` (one actionable line) for a plan that cannot run.
"""
from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from vbatch.engine.executor import backend as backend_rule
from vbatch.env import DEVICE
from vbatch.errors import VBatchUsageError
from vbatch.jobs.config import JobConfig

RAY_INSTALL_HINT = "pip install 'vbatch[ray]'"


@dataclass(frozen=True, slots=True)
class Resources:
    """Devices a job may use: `gpu_ids` in `CUDA_VISIBLE_DEVICES` naming (empty on CPU)."""

    num_cpus: int
    gpu_ids: tuple[str, ...] = ()

    @property
    def num_gpus(self) -> int:
        """Number of usable GPUs."""
        return len(self.gpu_ids)


def local_resources() -> Resources:
    """This node's CPUs and the GPUs torch can see (honouring `CUDA_VISIBLE_DEVICES`; none
    when `VBATCH_DEVICE=cpu`)."""
    import torch  # noqa: PLC0415 - start-up: keeps `vbatch --help` free of torch

    pinned_to_cpu = DEVICE.read() == "cpu"
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() and not pinned_to_cpu else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [item.strip() for item in visible.split(",") if item.strip()][:num_gpus]
    else:
        ids = [str(index) for index in range(num_gpus)]
    return Resources(num_cpus=os.cpu_count() or 1, gpu_ids=tuple(ids))


def is_ray_importable() -> bool:
    """True when `import ray` works (any ImportError, e.g. from a broken install, is False)."""
    try:
        importlib.import_module("ray")
    except ImportError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class JobPlan:
    """How a job is spread (see module docstring). `device_groups[r]` lists replica r's GPU ids
    for the local runner on GPUs, and is empty otherwise (CPU ranks, or placement by Ray)."""

    runner: str
    runner_reason: str
    num_replicas: int
    tp_size: int
    pp_size: int
    executor: str
    device: str
    device_groups: tuple[tuple[str, ...], ...]
    ray_address: str | None

    @property
    def world_size(self) -> int:
        """Ranks (devices) per replica: tp x pp."""
        return self.tp_size * self.pp_size


def make_plan(config: JobConfig, resources: Resources, *,
              ray_available: Callable[[], bool] = is_ray_importable) -> JobPlan:
    """The plan for `config` on `resources`. `ray_available` is called at most once, and only
    when the runner or executor choice depends on it. Raises VBatchUsageError for an
    impossible plan (an executor the engine would refuse included)."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    world = tp * pp
    on_gpu = resources.num_gpus > 0
    ray_available = functools.cache(ray_available)        # asked once for runner + executor
    replicas = config.replicas or (max(1, resources.num_gpus // world) if on_gpu else 1)
    needed_gpus = replicas * world if on_gpu else 0
    runner, reason = _choose_runner(config, resources, needed_gpus, ray_available)
    groups: tuple[tuple[str, ...], ...] = tuple(() for _ in range(replicas))
    if runner == "local" and on_gpu:
        if needed_gpus > resources.num_gpus:
            raise VBatchUsageError(
                f"{replicas} replica(s) x tp {tp} x pp {pp} need {needed_gpus} GPUs but this node "
                f"has {resources.num_gpus}; use fewer --replicas or --runner ray on a cluster")
        groups = tuple(resources.gpu_ids[r * world:(r + 1) * world] for r in range(replicas))
    executor = _choose_executor(config, resources, runner, replicas, ray_available)
    return JobPlan(runner=runner, runner_reason=reason, num_replicas=replicas, tp_size=tp,
                   pp_size=pp, executor=executor, device="cuda" if on_gpu else "cpu",
                   device_groups=groups,
                   ray_address=config.ray_address if runner == "ray" else None)


def _choose_executor(config: JobConfig, resources: Resources, runner: str, replicas: int,
                     ray_available: Callable[[], bool]) -> str:
    """The backend each replica's engine will pick where it runs (see module docstring)."""
    world = config.tensor_parallel_size * config.pipeline_parallel_size
    if runner == "local" and replicas == 1:        # the fast path: the engine runs here
        visible, in_group = resources.num_gpus, backend_rule.in_ray_placement_group()
    else:          # a replica process (its device group) or a Ray actor (the GPUs it reserves)
        visible, in_group = (world if resources.num_gpus else 0), False
    try:
        return backend_rule.choose_backend(
            config.distributed_executor_backend, world_size=world,
            device_type="cuda" if resources.num_gpus else "cpu", num_visible_gpus=visible,
            in_placement_group=in_group, ray_available=ray_available)
    except ValueError as error:
        raise VBatchUsageError(str(error)) from None


def _choose_runner(config: JobConfig, resources: Resources, needed_gpus: int,
                   ray_available: Callable[[], bool]) -> tuple[str, str]:
    if config.runner == "local":
        return "local", "--runner local"
    if config.runner == "ray":
        if not ray_available():
            raise VBatchUsageError(f"--runner ray needs Ray, which is not importable here: "
                                   f"{RAY_INSTALL_HINT} (or use --runner local)")
        where = f"cluster at {config.ray_address}" if config.ray_address else "private local Ray"
        return "ray", f"--runner ray ({where})"
    wants_ray = None
    if config.ray_address:
        wants_ray = f"auto: Ray cluster address {config.ray_address}"
    elif needed_gpus > resources.num_gpus:
        wants_ray = f"auto: needs {needed_gpus} GPUs, this node has {resources.num_gpus}"
    if wants_ray is None:
        return "local", "auto: no Ray cluster address and the job fits on this node"
    if not ray_available():
        return "local", f"{wants_ray}, but Ray is not installed ({RAY_INSTALL_HINT})"
    return "ray", wants_ray


def format_plan(plan: JobPlan) -> list[str]:
    """The plan as `(label, value)`-style lines for the dry run and the job log."""
    lines = [
        f"runner        {plan.runner} ({plan.runner_reason})",
        f"replicas      {plan.num_replicas}",
        f"tp x pp       {plan.tp_size} x {plan.pp_size} = {plan.world_size} rank(s) per replica",
        f"executor      {plan.executor}",
        f"device        {plan.device}",
    ]
    for index, group in enumerate(plan.device_groups):
        if group:
            where = f"GPUs {','.join(group)} (CUDA_VISIBLE_DEVICES)"
        elif plan.runner == "ray" and plan.executor == "ray":
            where = f"a placement group of {plan.world_size} bundle(s), one Ray actor per rank"
        elif plan.runner == "ray":
            kind = "GPU" if plan.device == "cuda" else "CPU"
            where = f"{plan.world_size} {kind}(s) reserved by its Ray actor, placed by Ray"
        else:
            where = f"{plan.world_size} CPU rank process(es)" if plan.world_size > 1 \
                else "this node's CPUs, in one process"
        lines.append(f"replica {index:<5} {where}")
    return lines
