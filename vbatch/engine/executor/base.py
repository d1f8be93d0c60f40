"""The executor contract: run one method on every rank of the engine and collect the results.

Calls are asynchronous: `submit` queues `Worker.<method>(*args)` on every rank and returns a
`PendingResult` at once. Each rank runs its calls strictly in submission order, so an engine
can keep several model steps in flight (one per pipeline stage: while the last stage samples
step A, the first stage already runs step B), and `PendingResult.results()` blocks only for
the step it belongs to.
"""
from __future__ import annotations

from abc import ABC, abstractmethod


class WorkerError(RuntimeError):
    """A worker rank raised or died; the message names the rank and the cause."""


class PendingResult(ABC):
    """The future results of one `submit` (one value per rank, in rank order)."""

    @abstractmethod
    def results(self) -> list:
        """Block until every rank has answered; raise WorkerError if one failed."""

    def driver_result(self):
        """The one non-None result (the sampling rank's token ids for `execute_model_async`)."""
        return next(r for r in self.results() if r is not None)


class DoneResult(PendingResult):
    """Results that were computed synchronously."""

    def __init__(self, values: list):
        self.values = values

    def results(self) -> list:
        return self.values


class Executor(ABC):
    """Drives the tp x pp workers of one engine. The engine only ever calls `submit`,
    `collective_rpc` and `execute_model_async`; how the workers live (in-process, local processes,
    Ray actors) is hidden."""

    world_size: int = 1

    @abstractmethod
    def submit(self, method: str, *args) -> PendingResult:
        """Queue `Worker.<method>(*args)` on every rank; returns without waiting."""

    def collective_rpc(self, method: str, *args) -> list:
        """Call `Worker.<method>(*args)` on every rank and wait; results in rank order."""
        return self.submit(method, *args).results()

    def execute_model_async(self, step) -> PendingResult:
        """Start one model step (a `StepInput`) on every rank; `.driver_result()` gives the
        sampling rank's `StepOutput`."""
        return self.submit("execute_model", step)

    @abstractmethod
    def shutdown(self) -> None:
        """Release the workers (idempotent)."""
