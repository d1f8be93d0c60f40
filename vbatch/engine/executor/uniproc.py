"""The in-process executor: tp = pp = 1, the single worker lives in the engine's process."""
from __future__ import annotations

from vbatch.engine.executor.base import DoneResult, Executor, PendingResult
from vbatch.engine.worker import Worker, WorkerSpec


class UniProcExecutor(Executor):
    """One worker, called directly (no processes, no torch.distributed); `submit` runs the
    call before returning, so there is never more than one step in flight."""

    def __init__(self, spec: WorkerSpec):
        self.worker = Worker(spec)

    def submit(self, method: str, *args) -> PendingResult:
        return DoneResult([getattr(self.worker, method)(*args)])

    def shutdown(self) -> None:
        """Nothing to release: the worker lives in the engine's process and goes with it."""
