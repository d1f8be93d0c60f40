"""The job plan: resources -> R replicas x (tp x pp) devices, the executor, and the runner.

A replica is one `LLMEngine` over its own group of tp x pp devices (its ranks). The plan decides:

- **replicas**: `--replicas` when given, else as many as fit (GPUs // (tp x pp)) on a GPU
  machine, 1 on a CPU machine (one engine already uses every core).
- **resources**: this node's, except on the Ray runner with a cluster address: there the
  cluster's (every alive node's GPUs, read by connecting once), so a GPU-less head node still
  plans for the workers' GPUs, and a replica whose tp x pp ranks are local processes (the mp
  executor) must fit on one node.
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
    """Devices a job may use. This node's: `gpu_ids` in `CUDA_VISIBLE_DEVICES` naming (empty
    on CPU). A Ray cluster's: `gpus_per_node`, each alive node's GPU count (`gpu_ids` empty:
    Ray assigns them)."""

    num_cpus: int
    gpu_ids: tuple[str, ...] = ()
    gpus_per_node: tuple[int, ...] | None = None

    @property
    def num_gpus(self) -> int:
        """Number of usable GPUs (on a cluster: of all its nodes)."""
        if self.gpus_per_node is not None:
            return sum(self.gpus_per_node)
        return len(self.gpu_ids)

    @property
    def max_gpus_per_node(self) -> int:
        """The most GPUs one node has: the largest replica whose ranks share a node."""
        if self.gpus_per_node is not None:
            return max(self.gpus_per_node, default=0)
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


def ray_cluster_resources(address: str) -> Resources:
    """The Ray cluster at `address`'s resources (every alive node's CPUs and GPUs; no GPUs
    with `VBATCH_DEVICE=cpu`), read by connecting to it and disconnecting. Raises ValueError
    (one line) when it cannot connect."""
    from vbatch.engine.executor import ray_cluster  # noqa: PLC0415 - Ray is optional

    ray = ray_cluster.import_ray()
    num_cpus, gpus_per_node = ray_cluster.cluster_nodes(ray, address)
    if DEVICE.read() == "cpu":
        gpus_per_node = tuple(0 for _ in gpus_per_node)
    return Resources(num_cpus=num_cpus, gpus_per_node=gpus_per_node)


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
              ray_available: Callable[[], bool] = is_ray_importable,
              cluster_resources: Callable[[str], Resources] = ray_cluster_resources
              ) -> JobPlan:
    """The plan for `config` on this node's `resources`, or on the Ray runner with a cluster
    address on `cluster_resources(address)`. `ray_available` is called at most once, and only
    when the runner or executor choice depends on it. Raises VBatchUsageError for an
    impossible plan (an executor the engine would refuse included)."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    world = tp * pp
    ray_available = functools.cache(ray_available)        # asked once for runner + executor
    replicas = _num_replicas(config, resources)
    needed_gpus = replicas * world if resources.num_gpus else 0
    runner, reason = _choose_runner(config, resources, needed_gpus, ray_available)
    if runner == "ray" and config.ray_address:
        try:
            resources = cluster_resources(config.ray_address)
        except ValueError as error:
            raise VBatchUsageError(str(error)) from None
        replicas = _num_replicas(config, resources)
        _check_fits_cluster(config, resources, replicas)
    on_gpu = resources.num_gpus > 0
    needed_gpus = replicas * world if on_gpu else 0
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


def _num_replicas(config: JobConfig, resources: Resources) -> int:
    """`--replicas`, else as many as fit: on a cluster, whole replicas per node when one fits
    on a node (its ranks are then local processes)."""
    world = config.tensor_parallel_size * config.pipeline_parallel_size
    if config.replicas:
        return config.replicas
    if not resources.num_gpus:
        return 1
    if resources.gpus_per_node is not None and world <= resources.max_gpus_per_node:
        return max(1, sum(count // world for count in resources.gpus_per_node))
    return max(1, resources.num_gpus // world)


def _check_fits_cluster(config: JobConfig, resources: Resources, replicas: int) -> None:
    """VBatchUsageError when a GPU cluster cannot hold `replicas` replicas at once (Ray
    would wait for the missing GPUs until the actor start timeout). A replica larger than a
    node is the executor rule's business (`_choose_executor`)."""
    if not resources.num_gpus:
        return
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    world = tp * pp
    if replicas * world > resources.num_gpus:
        raise VBatchUsageError(
            f"{replicas} replica(s) x tp {tp} x pp {pp} need {replicas * world} GPUs but the Ray "
            f"cluster at {config.ray_address} has {resources.num_gpus}; use fewer --replicas")


def _choose_executor(config: JobConfig, resources: Resources, runner: str, replicas: int,
                     ray_available: Callable[[], bool]) -> str:
    """The backend each replica's engine will pick where it runs (see module docstring)."""
    world = config.tensor_parallel_size * config.pipeline_parallel_size
    if runner == "local" and replicas == 1:        # the fast path: the engine runs here
        visible, in_group = resources.num_gpus, backend_rule.in_ray_placement_group()
    else:          # a replica process (its device group) or a Ray actor (the GPUs it reserves,
        # on one node: a replica larger than any node needs Ray actors for its ranks)
        visible = world if resources.num_gpus else 0
        if resources.gpus_per_node is not None:         # a cluster: the largest node bounds it
            visible = min(visible, resources.max_gpus_per_node)
        in_group = False
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
