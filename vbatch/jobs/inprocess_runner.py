"""The in-process pool: one replica whose engine runs in this process (no extra process, no
IPC). The fast path of a single-replica job on this node; its tp x pp ranks, if any, are the
engine's own worker processes."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pyarrow as pa

from vbatch.jobs.batch_order import InputOrder, tag_batch, untag_batch
from vbatch.jobs.config import JobConfig
from vbatch.jobs.job_inputs import JobInputs
from vbatch.jobs.plan import JobPlan
from vbatch.jobs.progress import ProgressReporter
from vbatch.jobs.replica import Replica, ReplicaCounters
from vbatch.jobs.replica_engine import model_info, start_replica


class InProcessPool:
    """One `Replica` in this process (see `jobs/pool.ReplicaPool` for the contract)."""

    def __init__(self, config: JobConfig, plan: JobPlan, *, started: float):
        self.config, self.plan = config, plan
        self._started = started
        self._replica: Replica | None = None
        self.model_info: dict = {}
        self.load_time_s = 0.0

    def __enter__(self) -> InProcessPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._replica is not None:
            self._replica.engine.shutdown()     # no worker process outlives the job

    def outputs(self, job: JobInputs, reporter: ProgressReporter) -> Iterator[pa.RecordBatch]:
        """Load the engine, then stream `job`'s batches through it (the engine finishes
        batches in completion order; `--preserve-order` holds them back into input order)."""
        self._replica = start_replica(self.config, job.prompt_column)
        self.model_info = model_info(self._replica.engine)
        self.load_time_s = time.perf_counter() - self._started
        reporter.start(job.total_rows)
        if not self.config.preserve_order:
            yield from self._replica.process(job.batches(self.config),
                                             on_progress=reporter.update)
            return
        tagged = (tag_batch(batch, seq) for seq, batch in enumerate(job.batches(self.config)))
        in_order = InputOrder()
        for out_batch in self._replica.process(tagged, on_progress=reporter.update):
            yield from in_order.release(*untag_batch(out_batch))

    def counters(self) -> list[ReplicaCounters]:
        """The replica's counters (empty before `outputs` started it)."""
        return [self._replica.counters] if self._replica is not None else []

    def replica_stats(self) -> list[dict]:
        """One summary entry: index 0, its state and counters."""
        return [{"index": 0, "state": "done", **dataclasses.asdict(counters)}
                for counters in self.counters()]
