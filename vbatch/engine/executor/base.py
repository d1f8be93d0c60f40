"""The executor contract: run one method on every rank of the engine and collect the results."""
from __future__ import annotations

from abc import ABC, abstractmethod


class Executor(ABC):
    """Drives the tp x pp workers of one engine. The engine only ever calls `collective_rpc`
    and `execute_model`; how the workers live (in-process, processes, Ray actors) is hidden."""

    @abstractmethod
    def collective_rpc(self, method: str, *args) -> list:
        """Call `Worker.<method>(*args)` on every rank; results in rank order."""

    def execute_model(self, seqs) -> list[int]:
        """Run one step on every rank; return the sampling rank's token ids."""
        results = self.collective_rpc("execute_model", seqs)
        return next(r for r in results if r is not None)

    def shutdown(self) -> None:
        """Release the workers (idempotent)."""
