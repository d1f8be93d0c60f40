"""The replica-pool interface that `run_job` drives, and the choice of pool for a plan.

A pool owns the replicas of one job (engines over their device groups) and turns the job's
input batches into output batches; it never writes (the job pipeline, `jobs/runner.py`, is the
only writer). Three implementations:

- `InProcessPool` (`jobs/inprocess_runner.py`): one replica in this process, the fast path;
- `LocalReplicaPool` (`jobs/local_runner.py`): replica processes on this node;
- `RayReplicaPool` (`jobs/ray_runner.py`): Ray Data replica actors.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Protocol

import pyarrow as pa

from vbatch.jobs.config import JobConfig
from vbatch.jobs.job_inputs import JobInputs
from vbatch.jobs.plan import JobPlan
from vbatch.jobs.progress import ProgressReporter
from vbatch.jobs.replica import ReplicaCounters


class ReplicaPool(Protocol):
    """What the job pipeline needs of a pool. A context manager: leaving it, on success, error,
    Ctrl-C or SIGTERM, stops every replica and its workers.

    `outputs(job, reporter)` starts the replicas (calling `reporter.start(job.total_rows)`
    once, when progress begins: before loading replicas whose states it reports, after the
    load of an in-process engine), feeds them `job.batches(config)` and yields
    output batches (columns of `job.out_schema` plus the hidden position column; input order
    with `--preserve-order`) as rows finish, and a batch of zero rows
    (`batch_order.idle_batch()`) at least every `batch_order.IDLE_INTERVAL_S` while none comes
    back, so the caller can commit on time; it raises the first user error (ValueError) or a
    replica failure. Each input row's output rows (its n samples) come in one batch, exactly
    once, also when a replica died and was restarted.
    After it: `model_info` (the manifest's model entry), `load_time_s` (from the job's start
    until every replica had loaded), `counters()` (one `ReplicaCounters` per replica) and
    `replica_stats()` (per-replica dicts for `_run_summary.json`).
    """

    model_info: dict
    load_time_s: float

    def __enter__(self) -> ReplicaPool: ...

    def __exit__(self, exc_type, exc, tb) -> None: ...

    def outputs(self, job: JobInputs, reporter: ProgressReporter) -> Iterator[pa.RecordBatch]: ...

    def counters(self) -> list[ReplicaCounters]: ...

    def replica_stats(self) -> list[dict]: ...


def make_pool(config: JobConfig, plan: JobPlan, *, started: float) -> ReplicaPool:
    """The pool that runs `plan`: in this process for one local replica, else local processes
    or Ray. `started`: the job's `time.perf_counter()` start, for `load_time_s`."""
    # The replicas' engines run the executor the plan chose (and `--dry-run` printed); the
    # engine still checks it against what it sees.
    config = dataclasses.replace(config, distributed_executor_backend=plan.executor)
    # Imported by choice: Ray is an optional dependency, and each runner pulls in its own.
    if plan.runner == "ray":
        from vbatch.jobs.ray_runner import RayReplicaPool  # noqa: PLC0415 - optional dependency (vbatch[ray])
        return RayReplicaPool(config, plan, started=started)
    if plan.num_replicas > 1:
        from vbatch.jobs.local_runner import LocalReplicaPool  # noqa: PLC0415 - lazy: each runner pulls in its own
        return LocalReplicaPool(config, plan, started=started)
    from vbatch.jobs.inprocess_runner import InProcessPool  # noqa: PLC0415 - lazy: each runner pulls in its own
    return InProcessPool(config, plan, started=started)
