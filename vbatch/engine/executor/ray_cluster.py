"""Ray plumbing for the `ray` executor and the Ray runner: importing Ray, connecting to a
cluster or starting a private one, and reserving one placement-group bundle per rank. Imported
only when Ray is used.

A private instance listens on loopback only. Ray binds every component (GCS, raylet, workers,
agents, metrics) to 127.0.0.1 when the node address is a loopback one, but on Linux `ray.init`
replaces a loopback `_node_ip_address` with the machine's external address unless
`ray_constants.ENABLE_RAY_CLUSTER` is off, as on Windows and macOS; `start_private_ray`
turns it off (and sets its environment variable for the processes it starts) while it starts
the instance. A cluster address is checked before `ray.init`, which would otherwise retry an
address where nothing answers for minutes. Both keep the SIGTERM handler the caller installed:
`ray.init` replaces it with one that exits with status 15, and Ray's C++ core worker adds one
that prints a stack dump.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import vbatch

#: How long a cluster address may take to accept a TCP connection before the job fails.
CONNECT_TIMEOUT_S = 10.0

#: Ray's switch for its single-machine (Windows/macOS) mode, where the node address stays
#: loopback (`ray._private.ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR`).
_RAY_CLUSTER_MODE_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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
        connect_to_cluster(ray, address)
        return False
    num_cpus = max(os.cpu_count() or 1, world_size) if device_type == "cpu" else None
    start_private_ray(ray, num_cpus=num_cpus)
    return True


def start_private_ray(ray, *, num_cpus: int | None) -> None:
    """Start a single-node Ray instance for this process: no dashboard, every component
    listening on 127.0.0.1 only (see module docstring); the caller's SIGTERM handler kept."""
    with _loopback_node_address(), _keeping_sigterm_handler():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False, logging_level="warning")


def connect_to_cluster(ray, address: str) -> None:
    """Connect this process to the Ray cluster at `address` (``HOST:PORT``, ``ray://HOST:PORT``
    or ``auto``), keeping the caller's SIGTERM handler. Raises a one-line ValueError naming the
    address, within about CONNECT_TIMEOUT_S, when it is malformed, its host does not resolve,
    nothing accepts a connection there, or Ray finds no cluster."""
    check_cluster_address(address)
    try:
        with _keeping_sigterm_handler():
            ray.init(address=address, log_to_driver=False, logging_level="warning")
    except ConnectionError as error:
        raise ValueError(f"cannot connect to the Ray cluster at {address!r}: "
                         f"{_first_line(str(error))}") from None


def cluster_nodes(ray, address: str) -> tuple[int, tuple[int, ...]]:
    """The cluster at `address`: its CPUs, and each alive node's GPU count, read by connecting
    (`connect_to_cluster`: its errors) and disconnecting again; a process already connected
    stays so."""
    connected_before = ray.is_initialized()
    if not connected_before:
        connect_to_cluster(ray, address)
    try:
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        num_cpus = sum(int(node["Resources"].get("CPU", 0)) for node in nodes)
        return num_cpus, tuple(int(node["Resources"].get("GPU", 0)) for node in nodes)
    finally:
        if not connected_before:
            ray.shutdown()


def check_cluster_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """ValueError naming `address` unless it is ``auto`` / ``local`` or a ``[ray://]HOST:PORT``
    whose host resolves and accepts a TCP connection within `timeout_s`."""
    if address in ("auto", "local"):          # Ray itself fails fast when it finds none
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")                   # [::1]:6379
    if not sep or not host or not port.isdigit():
        raise ValueError(f"Ray cluster address {address!r} is not HOST:PORT (e.g. HEAD:6379, "
                         "ray://HEAD:10001 or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except socket.gaierror as error:
        raise ValueError(f"Ray cluster address {address!r}: host {host!r} does not resolve "
                         f"({error.strerror})") from None
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"Ray cluster address {address!r}: nothing answers at {host}:{port} "
                         f"({reason}); is the cluster running (ray start --head)?") from None


@contextlib.contextmanager
def _loopback_node_address() -> Iterator[None]:
    """Ray's single-machine mode while a private instance starts (see module docstring)."""
    from ray._private import ray_constants  # noqa: PLC0415 - optional dependency (vbatch[ray])
    previous_mode = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    previous_variable = os.environ.get(_RAY_CLUSTER_MODE_VARIABLE)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[_RAY_CLUSTER_MODE_VARIABLE] = "0"     # inherited by the GCS, raylet, workers
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous_mode
        if previous_variable is None:
            os.environ.pop(_RAY_CLUSTER_MODE_VARIABLE, None)
        else:
            os.environ[_RAY_CLUSTER_MODE_VARIABLE] = previous_variable


@contextlib.contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """Put back a SIGTERM handler installed from Python (the CLI's: exit 143, workers stopped)
    after `ray.init`; with the default handler, Ray's stays (it shuts Ray down on SIGTERM).
    A SIGTERM that lands during `ray.init` (whose handler raises SystemExit(15)) is handed to
    the caller's handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    except SystemExit as stop:
        if stop.code == signal.SIGTERM and callable(previous):
            previous(signal.SIGTERM, None)
        raise
    finally:
        if previous is not None and previous is not signal.SIG_DFL:
            signal.signal(signal.SIGTERM, previous)   # also replaces the C++ dump handler


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "unknown error")


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
