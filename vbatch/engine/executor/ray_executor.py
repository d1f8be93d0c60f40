"""The `ray` executor: one Ray actor per rank, possibly spread over several nodes.

Rank r runs in bundle r of a placement group (the caller's, when the engine itself runs inside
one, else a PACK group created here and removed on shutdown). When every rank landed on one
node, they meet through a file store in a private directory rank 0's actor creates there
(removed on shutdown) and talk over loopback, opening no port to the network
(`parallel/rendezvous.py`); across nodes, rank 0's actor picks a free port on its own node and
every rank joins torch.distributed at ``tcp://<rank 0 node IP>:<port>``. A Ray actor runs the
calls of one caller in submission order, which keeps several pipeline steps in flight safe, as
with `mp`.

A rank whose actor dies (RayActorError) or raises (RayTaskError) becomes a WorkerError naming
the rank; then every actor is killed, so nothing outlives the engine. Ray is imported only
here and in `ray_cluster` (never by the `uni` / `mp` paths).
"""
from __future__ import annotations

import os
import socket

import torch

from vbatch.engine.executor import ray_cluster
from vbatch.engine.executor.base import Executor, PendingResult, WorkerError
from vbatch.engine.worker import WorkerSpec, start_worker
from vbatch.parallel.rendezvous import LocalRendezvous

__all__ = ["RayExecutor", "RankActor", "WorkerError"]

_FAILURE_GRACE_S = 2.0        # after one rank fails, how long to look for a rank that died


class RankActor:
    """The body of one rank's Ray actor: builds the rank with `start_worker`, then runs
    `Worker.<method>(*args)` on request."""

    def __init__(self):
        self.worker = None
        self.rendezvous: LocalRendezvous | None = None

    def node_id(self) -> str:
        """The Ray node this actor runs on."""
        import ray  # noqa: PLC0415 - optional dependency (vbatch[ray])
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()

    def gpu_ids(self) -> list[str]:
        """The GPUs Ray assigned to this actor (physical ids on its node; none on CPU). Reading
        them does not initialise CUDA, so `start` can still widen CUDA_VISIBLE_DEVICES."""
        import ray  # noqa: PLC0415 - optional dependency (vbatch[ray])
        return [str(gpu) for gpu in ray.get_gpu_ids()]

    def free_port(self) -> int:
        """A TCP port that is free on this actor's node (for the torch.distributed rendezvous)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def open_rendezvous(self) -> str:
        """Create a private file-store rendezvous on this node (for ranks all on this node);
        return its init method."""
        self.rendezvous = LocalRendezvous()
        return self.rendezvous.init_method

    def close_rendezvous(self) -> None:
        """Remove the rendezvous `open_rendezvous` created, if any."""
        if self.rendezvous is not None:
            self.rendezvous.close()

    def start(self, spec: WorkerSpec, world_rank: int, tp_size: int, pp_size: int,
              init_method: str, single_node: bool = False,
              gpus: tuple[str, int] | None = None) -> None:
        """Join the engine's process groups and load this rank's shard (`single_node`: every
        rank is on this node; sockets on loopback). `gpus`: (the GPU ids of every rank of the
        engine on this node, this rank's index among them), so co-located ranks see each
        other's GPUs and NCCL can use peer-to-peer between them."""
        if gpus is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]
        if torch.device(spec.device).type == "cuda" and torch.cuda.device_count() < 1:
            raise RuntimeError(f"rank {world_rank} sees no GPU (CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        self.worker = start_worker(spec, world_rank=world_rank, tp_size=tp_size,
                                   pp_size=pp_size, init_method=init_method,
                                   single_node=single_node,
                                   device_index=None if gpus is None else gpus[1])

    def execute_method(self, method: str, *args):
        """`Worker.<method>(*args)` on this rank."""
        return getattr(self.worker, method)(*args)


class RayExecutor(Executor):
    """tp_size x pp_size rank actors on a Ray cluster (see module docstring).

    Connects to Ray as `ray_cluster.connect` describes, reserves the bundles (ValueError if the
    cluster cannot hold them within `placement_timeout_s`), starts the actors and waits until
    every rank has loaded its shard. `node_ids` / `pids` list where each rank runs.
    """

    def __init__(self, spec: WorkerSpec, *, tp_size: int, pp_size: int = 1,
                 placement_timeout_s: float = 60.0):
        ray = ray_cluster.import_ray()
        self._ray = ray
        self.world_size = tp_size * pp_size
        self.actors: list = []
        self.node_ids: list[str] = []
        self.pids: list[int] = []
        self._placement = None
        self._rendezvous_owner = None
        self._failed = False
        device_type = "cuda" if spec.device.startswith("cuda") else "cpu"
        self._started_ray = ray_cluster.connect(ray, device_type=device_type,
                                                world_size=self.world_size)
        try:
            self._placement = ray_cluster.reserve(
                ray, device_type=device_type, world_size=self.world_size, tp_size=tp_size,
                pp_size=pp_size, timeout_s=placement_timeout_s)
            self._start_actors(spec, tp_size, pp_size)
        except BaseException:
            self.shutdown()
            raise

    def _start_actors(self, spec: WorkerSpec, tp_size: int, pp_size: int) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: PLC0415 - optional dependency (vbatch[ray])
        ray, placement = self._ray, self._placement
        actor_class = ray.remote(RankActor)
        env = {"env_vars": ray_cluster.worker_env()}
        for rank in range(self.world_size):
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=placement.group, placement_group_bundle_index=rank,
                placement_group_capture_child_tasks=True)
            self.actors.append(actor_class.options(
                num_cpus=placement.num_cpus, num_gpus=placement.num_gpus,
                scheduling_strategy=strategy, runtime_env=env, max_restarts=0,
                max_task_retries=0).remote())
        self.node_ids = self._gather([a.node_id.remote() for a in self.actors])
        self.pids = self._gather([a.pid.remote() for a in self.actors])
        single_node = len(set(self.node_ids)) == 1
        if single_node:
            self._rendezvous_owner = self.actors[0]
            init_method = self._gather([self.actors[0].open_rendezvous.remote()])[0]
        else:
            port = self._gather([self.actors[0].free_port.remote()])[0]
            init_method = f"tcp://{ray_cluster.node_ip(ray, self.node_ids[0])}:{port}"
        gpus = co_located_gpus(self.node_ids,
                               self._gather([a.gpu_ids.remote() for a in self.actors]))
        self._gather([actor.start.remote(spec, rank, tp_size, pp_size, init_method, single_node,
                                         gpus[rank])
                      for rank, actor in enumerate(self.actors)])

    def submit(self, method: str, *args) -> PendingResult:
        if self._failed or not self.actors:
            raise WorkerError("the workers were shut down after an earlier failure")
        refs = [actor.execute_method.remote(method, *args) for actor in self.actors]
        return _RayResult(self, refs)

    def _gather(self, refs: list) -> list:
        """ray.get of one ref per rank (rank order). The first rank to fail ends the wait:
        after a short grace (a rank stuck in a collective often fails because a peer died, and
        the dead peer is the one to name) the executor shuts down and raises WorkerError."""
        ray = self._ray
        if self._failed:
            raise WorkerError("the workers were shut down after an earlier failure")
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending, failures = list(refs), {}
        while pending and not failures:
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            failures.update(self._failures(ready, rank_of))
        if failures:
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=_FAILURE_GRACE_S)
            failures.update(self._failures(ready, rank_of))
            self._failed = True
            self.shutdown()
            raise WorkerError(_describe(failures))
        return ray.get(refs)

    def _failures(self, ready: list, rank_of: dict) -> dict[int, tuple[str, str]]:
        """rank -> ("died" | "failed", first line of the cause) for the failed refs in ready."""
        from ray.exceptions import RayActorError, RayError, RayTaskError  # noqa: PLC0415 - optional dependency (vbatch[ray])
        failures = {}
        for ref in ready:
            try:
                self._ray.get(ref)
            except RayActorError as error:
                failures[rank_of[ref]] = ("died", _first_line(str(error)))
            except RayTaskError as error:
                cause = error.cause if isinstance(error.cause, BaseException) else error
                failures[rank_of[ref]] = ("failed",
                                          _first_line(f"{type(cause).__name__}: {cause}"))
            except RayError as error:
                failures[rank_of[ref]] = ("failed", _first_line(str(error)))
        return failures

    def shutdown(self) -> None:
        """Kill every rank actor, remove the placement group this executor created, and stop
        the Ray instance if this executor started it (idempotent)."""
        ray = getattr(self, "_ray", None)
        if ray is None or not ray.is_initialized():
            self.actors = []
            return
        owner, self._rendezvous_owner = self._rendezvous_owner, None
        if owner is not None:
            try:
                ray.get(owner.close_rendezvous.remote(), timeout=_FAILURE_GRACE_S)
            except Exception:            # rank 0 is dead: its private directory stays
                pass
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:            # already dead or gone with its node
                pass
        self.actors = []
        placement, self._placement = self._placement, None
        if placement is not None and placement.owned:
            from ray.util.placement_group import remove_placement_group  # noqa: PLC0415 - optional dependency (vbatch[ray])
            try:
                remove_placement_group(placement.group)
            except Exception:
                pass
        if self._started_ray:
            self._started_ray = False
            ray.shutdown()

    def __del__(self):
        if getattr(self, "actors", None):
            self.shutdown()


def co_located_gpus(node_ids: list[str], gpu_ids: list[list[str]]
                    ) -> list[tuple[str, int] | None]:
    """Per rank: (CUDA_VISIBLE_DEVICES listing the GPUs of every rank on its node, the index of
    its own first GPU in that list), or None for a rank without a GPU. Ray gives each actor
    only its own GPU, which hides co-located ranks' GPUs from NCCL's peer-to-peer path; as in
    vLLM, every rank of a node sees them all and selects its own by index."""
    by_node: dict[str, list[str]] = {}
    for node, ids in zip(node_ids, gpu_ids):
        by_node.setdefault(node, []).extend(ids)
    visible = {node: sorted(set(ids), key=lambda gpu: (len(gpu), gpu))
               for node, ids in by_node.items()}
    return [(",".join(visible[node]), visible[node].index(ids[0])) if ids else None
            for node, ids in zip(node_ids, gpu_ids)]


def _describe(failures: dict[int, tuple[str, str]]) -> str:
    """One line naming the root cause first: the lowest rank that died, else the lowest that
    raised (a survivor's collective error, if any, follows the dead rank)."""
    died = sorted(r for r, (kind, _) in failures.items() if kind == "died")
    failed = sorted(r for r, (kind, _) in failures.items() if kind == "failed")
    rank = (died or failed)[0]
    message = f"worker rank {rank} {failures[rank][0]}: {failures[rank][1]}"
    if died and failed:
        message += f"; rank {failed[0]} then failed: {failures[failed[0]][1]}"
    return message


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "unknown error")


class _RayResult(PendingResult):
    def __init__(self, executor: RayExecutor, refs: list):
        self.executor, self.refs, self._values = executor, refs, None

    def results(self) -> list:
        if self._values is None:
            self._values = self.executor._gather(self.refs)
        return self._values
