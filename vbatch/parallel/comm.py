"""Process groups and the plain collective tier used by the parallel layers.

A `GroupCoordinator` wraps one torch.distributed group together with this process's rank in it.
Every collective short-circuits when the group has a single member, so a tp=1 / pp=1 engine pays
nothing for being written on the parallel API.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class GroupCoordinator:
    """One communication group (a TP group or a PP group) as seen from one rank.

    `ranks` are global ranks in group order; `rank_in_group` is this process's index in `ranks`.
    `device_group` is the torch.distributed group used for tensor collectives (None when the
    group has one member, where no collective ever runs).
    """

    ranks: list[int]
    rank_in_group: int
    device_group: object | None = None

    @property
    def world_size(self) -> int:
        """Number of ranks in the group."""
        return len(self.ranks)

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    @staticmethod
    def single() -> GroupCoordinator:
        """A group of one member: every collective is the identity."""
        return GroupCoordinator(ranks=[0], rank_in_group=0, device_group=None)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group, in place; returns `x`."""
        if self.world_size == 1:
            return x
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` along `dim`, in group-rank order."""
        if self.world_size == 1:
            return x
        dim = dim % x.dim()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=dim)

    def isend(self, x: torch.Tensor, dst_rank_in_group: int):
        """Start a send of contiguous `x`; returns the work handle (`.wait()`). Keep `x` alive
        until the handle completes."""
        return dist.isend(x, dst=self.ranks[dst_rank_in_group], group=self.device_group)

    def recv(self, x: torch.Tensor, src_rank_in_group: int) -> torch.Tensor:
        """Receive into the preallocated `x` from another member of the group; returns `x`."""
        dist.recv(x, src=self.ranks[src_rank_in_group], group=self.device_group)
        return x
