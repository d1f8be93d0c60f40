"""Pipeline parallelism: which layers a stage owns, and passing activations between stages.

The decoder layers are split into pp_size contiguous ranges, one per stage. Stage 0 embeds the
tokens; every stage runs its layers; stage k sends its output hidden states [num_tokens, hidden]
to stage k + 1 (the same TP rank of the next stage: the PP groups are the columns of the
(pp, tp) grid, and every TP rank of a stage holds the full, replicated hidden states); the last
stage applies the final norm and the LM head. Sends are asynchronous (`isend`), so a stage
starts its next micro-batch while the previous one is still on the wire.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from vbatch.parallel.comm import GroupCoordinator

LAYER_PARTITION_ENV = "VBATCH_PP_LAYER_PARTITION"


def layer_partition(num_layers: int, pp_size: int) -> list[int]:
    """Number of layers per stage: even, the remainder on the first stages (the last stage
    also runs the LM head). `VBATCH_PP_LAYER_PARTITION="16,14"` sets it explicitly (pp > 1);
    its syntax is declared and checked up front in vbatch/env.py (parallel/ may not import it),
    the counts against this model here."""
    if pp_size > num_layers:
        raise ValueError(f"pipeline_parallel_size={pp_size} exceeds the model's {num_layers} "
                         f"layers; use at most {num_layers}")
    explicit = os.environ.get(LAYER_PARTITION_ENV, "").strip()
    if explicit and pp_size > 1:
        try:
            sizes = [int(part) for part in explicit.split(",")]
        except ValueError:
            raise ValueError(f"{LAYER_PARTITION_ENV}={explicit!r} must be comma-separated "
                             "integers") from None
        if len(sizes) != pp_size or sum(sizes) != num_layers or min(sizes) < 1:
            raise ValueError(f"{LAYER_PARTITION_ENV}={explicit!r} must give {pp_size} positive "
                             f"layer counts summing to {num_layers}")
        return sizes
    base, extra = divmod(num_layers, pp_size)
    return [base + (1 if stage < extra else 0) for stage in range(pp_size)]


def layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """[start, end) of the layers stage `pp_rank` owns."""
    sizes = layer_partition(num_layers, pp_size)
    start = sum(sizes[:pp_rank])
    return start, start + sizes[pp_rank]


class PPMissingLayer(nn.Identity):
    """Placeholder for a layer another stage owns: keeps layer indices (and so checkpoint
    names) aligned with the full model, holds no parameters."""


class StageLink:
    """Sends hidden states to the next stage and receives them from the previous one."""

    def __init__(self, pp_group: GroupCoordinator):
        self.pp_group = pp_group
        self._pending_send = None        # (work handle, tensor kept alive until sent)

    @property
    def is_first(self) -> bool:
        return self.pp_group.is_first_rank

    @property
    def is_last(self) -> bool:
        return self.pp_group.is_last_rank

    def recv_from_previous(self, num_tokens: int, hidden_size: int, dtype: torch.dtype,
                           device: torch.device) -> torch.Tensor:
        """Blocking receive of the previous stage's [num_tokens, hidden_size] output."""
        hidden = torch.empty(num_tokens, hidden_size, dtype=dtype, device=device)
        return self.pp_group.recv(hidden, self.pp_group.rank_in_group - 1)

    def send_to_next(self, hidden: torch.Tensor) -> None:
        """Start sending `hidden` to the next stage; the previous send is completed first, so
        at most one micro-batch per stage is on the wire."""
        self.wait()
        hidden = hidden.contiguous()
        work = self.pp_group.isend(hidden, self.pp_group.rank_in_group + 1)
        self._pending_send = (work, hidden)

    def wait(self) -> None:
        """Complete the outstanding send, if any."""
        if self._pending_send is not None:
            self._pending_send[0].wait()
            self._pending_send = None
