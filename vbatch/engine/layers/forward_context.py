"""What every layer of one forward step shares: positions, attention metadata, and each rotary
embedding evaluated at those positions (looked up once per step, not once per layer)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vbatch.engine.layers.attention import AttentionMetadata


@dataclass
class ForwardContext:
    """One step's [T] positions and metadata; `rope(embedding)` memoises embedding.at(positions)."""

    positions: torch.Tensor
    meta: AttentionMetadata
    _rope_steps: dict = field(default_factory=dict, repr=False)

    def rope(self, embedding):
        """The RotaryStep of `embedding` (a RotaryEmbedding) at this step's positions."""
        step = self._rope_steps.get(id(embedding))
        if step is None:
            step = self._rope_steps[id(embedding)] = embedding.at(self.positions)
        return step
