"""The in-process pool: one replica whose engine runs in this process (no extra process, no
IPC). The fast path of a single-replica job on this node; its tp x pp ranks, if any, are the
engine's own worker processes.

Finished rows are yielded as they finish (a few output batches a second, jobs/replica.py), and
a batch of zero rows every `IDLE_INTERVAL_S` when none finished, so the job can commit on time.
With `--preserve-order` rows are held back into input order, the replica reading at most
`_ORDER_WINDOW` batches past the first one not yet fully written (that bounds the rows held).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pyarrow as pa

from vbatch.jobs.batch_order import IDLE_INTERVAL_S, InputOrder, tag_batch, untag_batch
from vbatch.jobs.config import JobConfig
from vbatch.jobs.job_inputs import JobInputs
from vbatch.jobs.plan import JobPlan
from vbatch.jobs.progress import ProgressReporter
from vbatch.jobs.replica import (
    DEFAULT_EMIT_INTERVAL_S,
    NO_BATCH_YET,
    Replica,
    ReplicaCounters,
)
from vbatch.jobs.replica_engine import model_info, start_replica

#: With --preserve-order: input batches read past the first one not yet written.
_ORDER_WINDOW = 4


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
        """Load the engine, then stream `job`'s batches through it (rows come out as they
        finish; `--preserve-order` holds them back into input order)."""
        self._replica = start_replica(self.config, job.prompt_column)
        self.model_info = model_info(self._replica.engine)
        self.load_time_s = time.perf_counter() - self._started
        reporter.start(job.total_rows)
        emission = {"on_progress": reporter.update, "idle_batches": True,
                    "emit_interval_s": min(IDLE_INTERVAL_S, DEFAULT_EMIT_INTERVAL_S)}
        if not self.config.preserve_order:
            yield from self._replica.process(job.batches(self.config), **emission)
            return
        in_order = InputOrder()
        for out_batch in self._replica.process(_in_window(job.batches(self.config), in_order),
                                               **emission):
            if not out_batch.num_rows:
                yield out_batch
                continue
            yield from in_order.release(*untag_batch(out_batch))

    def counters(self) -> list[ReplicaCounters]:
        """The replica's counters (empty before `outputs` started it)."""
        return [self._replica.counters] if self._replica is not None else []

    def replica_stats(self) -> list[dict]:
        """One summary entry: index 0, its state and counters."""
        return [{"index": 0, "state": "done", **dataclasses.asdict(counters)}
                for counters in self.counters()]


def _in_window(batches, in_order: InputOrder):
    """`batches` (but those of zero rows) tagged (jobs/batch_order.py) and announced to
    `in_order`; `NO_BATCH_YET` while the next one would be `_ORDER_WINDOW` or more past the
    first batch not yet fully written."""
    nonempty = (batch for batch in batches if batch.num_rows)
    for seq, batch in enumerate(nonempty):
        in_order.expect(seq, batch.num_rows)
        while seq >= in_order.next_seq + _ORDER_WINDOW:
            yield NO_BATCH_YET
        yield tag_batch(batch, seq)
