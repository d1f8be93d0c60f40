"""The layout of one engine's ranks: world = pp x tp, groups from arange(world).reshape(pp, tp).

Global rank r sits in pipeline stage r // tp_size at tensor-parallel rank r % tp_size. The TP
groups are the rows of that grid, the PP groups its columns. A `ParallelState` is built once per
worker and handed explicitly to every layer that needs it (there is no module-level global).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from vbatch.parallel.comm import GroupCoordinator
from vbatch.parallel.rendezvous import use_loopback_interfaces


@dataclass
class ParallelState:
    """This rank's view of the engine's process groups and its compute device."""

    tp: GroupCoordinator
    pp: GroupCoordinator
    world_rank: int
    world_size: int
    device: torch.device

    @property
    def tp_rank(self) -> int:
        return self.tp.rank_in_group

    @property
    def tp_size(self) -> int:
        return self.tp.world_size

    @property
    def pp_rank(self) -> int:
        return self.pp.rank_in_group

    @property
    def pp_size(self) -> int:
        return self.pp.world_size

    @property
    def is_driver(self) -> bool:
        """The rank that samples: last pipeline stage, tensor-parallel rank 0."""
        return self.pp.is_last_rank and self.tp_rank == 0

    @staticmethod
    def single(device: torch.device | str = "cpu") -> ParallelState:
        """tp = pp = 1 in this process: no torch.distributed initialisation at all."""
        return ParallelState(tp=GroupCoordinator.single(), pp=GroupCoordinator.single(),
                             world_rank=0, world_size=1, device=torch.device(device))


def rank_grid(tp_size: int, pp_size: int) -> list[list[int]]:
    """Global ranks arranged as [pp_stage][tp_rank] (the reshape(pp, tp) layout)."""
    return [[stage * tp_size + t for t in range(tp_size)] for stage in range(pp_size)]


def init_parallel_state(*, world_rank: int, tp_size: int, pp_size: int, init_method: str,
                        device: torch.device, timeout_s: float = 120.0,
                        single_node: bool = False) -> ParallelState:
    """Join the engine's process group and build the TP and PP subgroups.

    Uses NCCL on CUDA devices and gloo on CPU. Every rank must call this with the same
    `init_method`: a `rendezvous.LocalRendezvous` ``file://`` URL when every rank runs on this
    node, else ``tcp://HOST:PORT`` on rank 0's node. `single_node`: every rank is on this node,
    so gloo / NCCL sockets bind to the loopback interface only. Subgroups are created in the
    same order on every rank, as torch.distributed requires.
    """
    world_size = tp_size * pp_size
    if world_size == 1:
        return ParallelState.single(device)
    if single_node:
        use_loopback_interfaces()
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    bound = {}
    if device.type == "cuda":
        # The rank's GPU first, and bound to the group: NCCL then creates its communicators
        # on it (never on cuda:0 of every rank) and eagerly, at init.
        torch.cuda.set_device(device)
        bound["device_id"] = device
    dist.init_process_group(backend=backend, init_method=init_method, rank=world_rank,
                            world_size=world_size, timeout=timeout, **bound)
    grid = rank_grid(tp_size, pp_size)
    tp_group = pp_group = None
    tp_ranks = pp_ranks = [world_rank]
    for stage_ranks in grid:
        group = dist.new_group(stage_ranks, timeout=timeout) if tp_size > 1 else None
        if world_rank in stage_ranks:
            tp_group, tp_ranks = group, stage_ranks
    for t in range(tp_size):
        column = [row[t] for row in grid]
        group = dist.new_group(column, timeout=timeout) if pp_size > 1 else None
        if world_rank in column:
            pp_group, pp_ranks = group, column
    return ParallelState(
        tp=GroupCoordinator(tp_ranks, tp_ranks.index(world_rank), tp_group),
        pp=GroupCoordinator(pp_ranks, pp_ranks.index(world_rank), pp_group),
        world_rank=world_rank, world_size=world_size, device=device)
