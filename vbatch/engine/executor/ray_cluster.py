"""Ray plumbing for the `ray` executor: importing Ray, connecting to a cluster, and reserving
one placement-group bundle per rank. Imported only when the `ray` backend is used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import vbatch


def import_ray():
    """The `ray` module, or a one-line ValueError telling the user how to install it."""
    try:
        import ray  # noqa: PLC0415 - optional dependency (vbatch[ray]): reported below
    except ImportError:
        raise ValueError("distributed_executor_backend='ray' needs Ray, which is not installed: "
                         "pip install 'vbatch[ray]'") from None
    return ray


def connect(ray, *, device_type: str, world_size: int) -> bool:
    """Make sure this process is connected to Ray; return True if it started a private instance
    (which its owner must `ray.shutdown()` later).

    Already initialised: used as is. `RAY_ADDRESS` set: connect to that cluster (`auto` finds
    one started with `ray start` on this machine). Otherwise: a private single-node instance
    without dashboard, with at least one CPU per rank on CPU (ranks are processes, as with mp).
    """
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="warning")
        return False
    num_cpus = max(os.cpu_count() or 1, world_size) if device_type == "cpu" else None
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             logging_level="warning")
    return True


def worker_env() -> dict[str, str]:
    """Environment variables for the rank actors: this vbatch first on PYTHONPATH (so every
    actor imports the same code as the engine, installed or not) and the VBATCH_* / HF_*
    settings. CUDA_VISIBLE_DEVICES is deliberately not passed: Ray sets it per actor."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(vbatch.__file__)))
    python_path = os.environ.get("PYTHONPATH")
    env = {"PYTHONPATH": package_root + (os.pathsep + python_path if python_path else "")}
    env.update({k: v for k, v in os.environ.items() if k.startswith(("VBATCH_", "HF_"))})
    return env


@dataclass
class Placement:
    """Where the ranks go: rank r in bundle r of `group`, each actor asking for `num_cpus` /
    `num_gpus` out of its bundle. `owned`: this executor created the group (and removes it)."""

    group: object
    num_cpus: float
    num_gpus: float
    owned: bool


def reserve(ray, *, device_type: str, world_size: int, tp_size: int, pp_size: int,
            timeout_s: float) -> Placement:
    """One bundle per rank: the current placement group's bundles when this process runs in
    one (a Ray Data replica actor, say), else a new PACK group of `world_size` bundles of
    {"GPU": 1} (CUDA) or {"CPU": 1} (CPU). Raises ValueError if it cannot be placed in time."""
    from ray.util.placement_group import (  # noqa: PLC0415 - optional dependency (vbatch[ray])
        get_current_placement_group,
        placement_group,
        remove_placement_group,
    )
    gpu = device_type == "cuda"
    current = get_current_placement_group()
    if current is not None:
        bundles = current.bundle_specs
        if len(bundles) < world_size or (
                gpu and any(b.get("GPU", 0) < 1 for b in bundles[:world_size])):
            raise ValueError(f"tp={tp_size} x pp={pp_size} needs {world_size} placement-group "
                             f"bundles{' with one GPU each' if gpu else ''}; the current "
                             f"placement group has {bundles}")
        # The group belongs to the caller, who may use part of each bundle itself.
        return Placement(current, num_cpus=0, num_gpus=1 if gpu else 0, owned=False)
    bundle = {"GPU": 1} if gpu else {"CPU": 1}
    group = placement_group([dict(bundle) for _ in range(world_size)], strategy="PACK")
    if not group.wait(timeout_s):
        remove_placement_group(group)
        raise ValueError(f"the ray executor needs {world_size} bundles of {bundle} "
                         f"(tp={tp_size} x pp={pp_size}), but none could be placed in "
                         f"{timeout_s:.0f} s; cluster has {_resources(ray.cluster_resources())}"
                         f" ({_resources(ray.available_resources())} free). Add nodes "
                         "(ray start --address=HEAD:6379) or lower --tp/--pp")
    return Placement(group, num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0, owned=True)


def _resources(resources: dict) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(shown.items())) or "no CPU/GPU"


def node_ip(ray, node_id: str) -> str:
    """The address Ray knows node `node_id` by (where rank 0 hosts the rendezvous)."""
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    raise RuntimeError(f"Ray node {node_id} is not in the cluster")
