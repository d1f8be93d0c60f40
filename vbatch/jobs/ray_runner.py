"""The Ray runner: a Ray Data pipeline of input blocks through a pool of replica actors.

    read_datasource(InputDatasource)            one read task per input file (a Parquet file:
                                                per range of row groups), streaming it through
                                                vbatch's own reader
      -> map_batches(ReplicaActor, concurrency=N)  each actor owns one LLMEngine via `Replica`
      -> iter_batches() in the driver           output rows written by our ParquetPartWriter,
                                                or (object-store output) only part entries,
                                                committed by it (not ray's write_parquet: we
                                                keep our commit protocol)

Reading goes through `io/reader.py` inside Ray read tasks (jobs/ray_inputs.py, not
`ray.data.read_json/read_csv`) so that the rows, their types (unified across files) and the
derived row keys (`<file>:<row>`) are exactly those of the local runner. Ray Data streams
blocks with backpressure, so memory is bounded by the blocks in flight. Read tasks reserve no
CPU (the replica actors may hold every CPU of a node), so at most `2 x replicas` run at once
(each a Ray worker process: unbounded, a file of many row groups would start dozens). With
every input file in an object store they run on any node and a Parquet file is split by
row-group ranges; local inputs are read on the driver's node.

Writing: with a local `--output` the driver writes every row (a replica on another node cannot
write the driver's disk), so every output row passes through it. With an object-store
`--output` each replica writes its own parts straight to the store and the driver receives and
commits only their part entries (jobs/ray_parts.py: names unique per replica attempt, orphans
of killed attempts removed, entries overlapping committed rows refused), so the bytes the
driver receives grow with the number of parts (a few hundred bytes each), not with the rows'
bytes; `transfer_stats()` counts them (the summary's "transfer"). Parts are then cut per block
(at most `batch_size` rows; a block's rows are committed together when it returns, so
`--commit-interval-s` does not apply: a replica cannot commit rows of a block Ray may still
replay), and `--preserve-order` keeps driver-side writing. The actor then runs its two queued
blocks in two threads (`max_concurrent_calls_per_actor=2`), the engine taken by one at a time,
so a block's parts upload while the next block generates; the ledger records per replica its
engine time (`busy_s`), upload time (`write_s`) and first-to-last block span (`active_s`).

Each actor reserves tp x pp GPUs (tp x pp CPUs on CPU-only clusters) and runs its ranks as local
processes (the mp executor); with `--distributed-executor-backend ray` the actor reserves nothing
and its engine places one Ray actor per rank in its own placement group of tp x pp bundles
(`engine/executor/ray_executor.py`), so a replica may span nodes. A `ReplicaLedger` actor collects
each replica's node, model and counters for the summary and the exactly-once check. With no
`--ray-address` and no Ray already running in this process, a private Ray is started (dashboard off,
every component listening on 127.0.0.1 only, enough logical CPUs for every replica plus the
readers) and shut down at the end; a cluster address where nothing answers fails the job at once
(`ray_cluster.connect_to_cluster`). Either way the CLI's SIGTERM handler survives `ray.init`, so
SIGTERM stops the job with exit code 143. Ray's own progress bars are off: the job's
`ProgressReporter` shows rows as output batches arrive. Work starts once every replica has
loaded; each actor then gets a block whenever it has room for one (at most 2 queued per actor).
An actor drains its engine at the end of each block (`batch_size` rows), so keep blocks well
above `max_num_seqs`.

Unlike the other pools, rows come back per block (in input order), not as they finish: Ray
Data retries a block whose actor died by replaying it and keeps only the output blocks (by
index) that the first attempt had not delivered, which is exactly-once only when a block's
output is the same on every attempt. Ray's iterator is consumed in the main thread (a thread
pulling from it outlives a SIGTERM's Ray shutdown and logs the executor's tracebacks), so
time-based commits (`--commit-interval-s`) happen when a block arrives.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import DataContext

from vbatch.engine.executor import ray_cluster
from vbatch.env import NUM_THREADS
from vbatch.errors import VBatchUsageError
from vbatch.io.positions import POSITION_COLUMN
from vbatch.io.schema import NUM_GENERATED_TOKENS, SAMPLE_INDEX, count_input_rows
from vbatch.jobs.config import JobConfig
from vbatch.jobs.job_inputs import JobInputs
from vbatch.jobs.plan import JobPlan
from vbatch.jobs.progress import ProgressReporter
from vbatch.jobs.ray_inputs import InputDatasource
from vbatch.jobs.ray_parts import (
    PART_REPORT_COLUMN,
    ReplicaPartWriter,
    WrittenParts,
    parse_reports,
    writes_on_replicas,
)
from vbatch.jobs.replica import ReplicaCounters
from vbatch.jobs.replica_engine import model_info, start_replica

#: How long Ray may take to start every replica actor (resources, model load) before the job
#: fails with Ray's "not enough resources for the requested actor pool".
ACTOR_START_TIMEOUT_S = 900


class ReplicaLedger:
    """Where replica actors register (getting their index) and report their counters."""

    def __init__(self):
        self.replicas: list[dict] = []
        self._spans: list[list[float | None]] = []
        self.start_errors: list[str] = []

    def start_failed(self, message: str) -> None:
        """A replica's engine refused to start with a user error (ValueError): `message`."""
        self.start_errors.append(message)

    def first_start_error(self) -> str | None:
        """The first start failure reported, if any."""
        return self.start_errors[0] if self.start_errors else None

    def register(self, node_id: str, pid: int, model: dict, counters: dict,
                 gpu_ids: list[str]) -> int:
        """A replica loaded its engine on `node_id` with Ray's `gpu_ids` (empty on CPU)."""
        self.replicas.append({"index": len(self.replicas), "node_id": node_id, "pid": pid,
                              "gpu_ids": gpu_ids,
                              "model": model, "state": "running", "num_calls": 0,
                              "busy_s": 0.0, "write_s": 0.0, "active_s": 0.0,
                              "counters": counters})
        self._spans.append([None, None])
        return len(self.replicas) - 1

    def report(self, index: int, counters: dict, span: tuple[float, float] = (0.0, 0.0),
               busy_s: float = 0.0, write_s: float = 0.0) -> None:
        """A replica finished a block: its counters; when it started and ended the block
        (`span`, wall-clock seconds), the seconds its engine spent on it (`busy_s`) and those
        it spent writing the block's parts (`write_s`, overlapping the next block's)."""
        entry = self.replicas[index]
        entry["num_calls"] += 1
        entry["counters"] = counters
        entry["busy_s"] = round(entry["busy_s"] + busy_s, 3)
        entry["write_s"] = round(entry["write_s"] + write_s, 3)
        first, last = self._spans[index]
        first = span[0] if first is None else min(first, span[0])
        last = span[1] if last is None else max(last, span[1])
        self._spans[index] = [first, last]
        entry["active_s"] = round(last - first, 3)    # first block's start to last's end

    def snapshot(self) -> list[dict]:
        return [dict(entry) for entry in self.replicas]


class ReplicaActor:
    """One replica as a Ray Data callable class: loads the engine once, then turns each input
    block into its output block (`Replica.process` on that block's batches). With `output_uri`
    (an object-store output) it writes the output rows as part files there itself and its
    output block holds only their reports (jobs/ray_parts.py)."""

    def __init__(self, config: JobConfig, prompt_column: str, input_schema: pa.Schema,
                 ledger, num_threads: int | None, device: str, output_uri: str | None = None,
                 out_schema: pa.Schema | None = None):
        if num_threads and NUM_THREADS.read() is None:
            os.environ[NUM_THREADS.name] = str(num_threads)
        self.input_schema = input_schema
        try:
            self.replica = start_replica(config, prompt_column, device)
        except ValueError as error:       # the driver reports it as the job's one-line error
            ray.get(ledger.start_failed.remote(str(error)))
            raise
        self.engine = self.replica.engine
        self.ledger = ledger
        context = ray.get_runtime_context()
        self.index = ray.get(ledger.register.remote(
            context.get_node_id(), os.getpid(), model_info(self.engine),
            dataclasses.asdict(self.replica.counters),
            [str(gpu) for gpu in context.get_accelerator_ids().get("GPU", [])]))
        self.part_writer = (None if output_uri is None else
                            ReplicaPartWriter(config, output_uri, out_schema, self.index))
        self._engine_lock = threading.Lock()

    def __call__(self, table: pa.Table) -> pa.Table:
        started_at = time.time()
        with self._engine_lock:       # two calls at once when writing: one engine at a time
            started = time.perf_counter()
            output = self._process(table)
            generated = time.perf_counter()
            counters = dataclasses.asdict(self.replica.counters)
        if self.part_writer is not None:     # overlaps the next block's generation
            output = self.part_writer.write_block(output)
        done = time.perf_counter()
        ray.get(self.ledger.report.remote(self.index, counters,
                                          (started_at, started_at + done - started),
                                          generated - started, done - generated))
        return output

    def _process(self, table: pa.Table) -> pa.Table:
        if not table.schema.equals(self.input_schema):
            table = table.select(self.input_schema.names).cast(self.input_schema)
        outputs = list(self.replica.process(table.combine_chunks().to_batches()))
        if not outputs:
            return table.slice(0, 0)
        # Rows finish in any order; Ray Data replays a retried block and keeps only the output
        # blocks the first attempt did not deliver (by index), so the block's output must be
        # the same whatever the order: input order (positions ascend within a block; the sort
        # is stable, so a row's samples stay adjacent and in order).
        output = pa.Table.from_batches(outputs)
        return output.take(pc.sort_indices(output, [(POSITION_COLUMN, "ascending")]))

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class RayReplicaPool:
    """`plan.num_replicas` Ray Data replica actors (see module docstring); a context manager
    that connects to (or starts) Ray on entry and disconnects (or shuts it down) on exit."""

    def __init__(self, config: JobConfig, plan: JobPlan, *, started: float):
        self.config, self.plan = config, plan
        self._started = started
        self._owns_ray = False
        self._ledger = None
        self._ledger_snapshot: list[dict] = []
        self._rows_written = 0
        self._received_bytes = self._received_blocks = 0
        self._writes_on_replicas = False
        self.model_info: dict = {}
        self.load_time_s = 0.0

    def __enter__(self) -> RayReplicaPool:
        if not ray.is_initialized():
            self._owns_ray = True
            if self.plan.ray_address:
                ray_cluster.connect_to_cluster(ray, self.plan.ray_address)
            else:
                cpus = max(os.cpu_count() or 1, self.plan.num_replicas * self.plan.world_size + 1)
                ray_cluster.start_private_ray(ray, num_cpus=cpus)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._ledger is not None:
            try:
                ray.kill(self._ledger)
            except Exception:  # noqa: BLE001 - Ray may already be gone (e.g. after Ctrl-C)
                pass
        if self._owns_ray:
            ray.shutdown()

    def writes_parts(self, job: JobInputs) -> bool:
        """True when the replicas write `job`'s part files themselves (an object-store
        output): `outputs` then yields `WrittenParts`, never rows, and the
        caller's part writer must be open before the replicas start."""
        return writes_on_replicas(self.config, job.output_dir)

    def transfer_stats(self) -> dict:
        """What the driver received from the replicas: blocks, their bytes (`nbytes`, counted
        as they arrive) and who wrote the parts ("replicas" or "driver")."""
        return {"driver_received_bytes": self._received_bytes,
                "driver_received_blocks": self._received_blocks,
                "parts_written_by": "replicas" if self._writes_on_replicas else "driver"}

    def outputs(self, job: JobInputs,
                reporter: ProgressReporter) -> Iterator[pa.RecordBatch | WrittenParts]:
        """Run the pipeline; yield output batches (input order with `preserve_order`), or with
        `writes_parts(job)` the `WrittenParts` of each finished block."""
        reporter.start(job.total_rows)
        context = DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        context.execution_options.preserve_order = self.config.preserve_order
        context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S   # every replica loads first
        if SAMPLE_INDEX in job.out_schema.names:
            # Ray Data splits a map's output past target_max_block_size; the n samples of a
            # row must reach the writer (and the exactly-once tally) in one batch.
            context.target_max_block_size = None
        self._ledger = ray.remote(num_cpus=0)(ReplicaLedger).remote()
        on_gpu = self.plan.device == "cuda"
        world = self.plan.world_size
        if self.plan.executor == "ray":      # the ranks are Ray actors in the engine's own
            resources = {"num_cpus": 0}      # placement group of tp x pp bundles
        elif on_gpu:
            resources = {"num_gpus": world, "num_cpus": 1}
        else:
            resources = {"num_cpus": world}
        self._writes_on_replicas = self.writes_parts(job)
        dataset = ray.data.read_datasource(InputDatasource(self.config, job), num_cpus=0,
                                           concurrency=2 * self.plan.num_replicas)
        # Writing its parts, an actor runs its two blocks in two threads, so one block's parts
        # upload while the next generates (the engine itself is taken by one at a time).
        concurrency = ({"max_concurrent_calls_per_actor": 2, "enable_true_multi_threading": True}
                       if self._writes_on_replicas else {})
        pool = ray.data.ActorPoolStrategy(size=self.plan.num_replicas,
                                          max_tasks_in_flight_per_actor=2, **concurrency)
        dataset = dataset.map_batches(
            ReplicaActor, batch_size=self.config.batch_size, batch_format="pyarrow",
            compute=pool, zero_copy_batch=True,
            # A dead replica actor is restarted this often (Ray Data's default is forever) and
            # its block retried; the driver writes each row once whatever is retried.
            max_restarts=self.config.max_replica_restarts,
            fn_constructor_kwargs={"config": self.config, "prompt_column": job.prompt_column,
                                   "input_schema": job.scan.schema.append(
                                       pa.field(POSITION_COLUMN, pa.int64())),
                                   "ledger": self._ledger,
                                   "num_threads": None if on_gpu else 1,
                                   "device": self.plan.device,
                                   "output_uri": (str(job.output_dir) if self._writes_on_replicas
                                                  else None),
                                   "out_schema": job.out_schema},
            **resources)
        for index in range(self.plan.num_replicas):
            reporter.set_replica_state(index, "loading")
        tables = dataset.iter_batches(batch_size=None, batch_format="pyarrow",
                                      prefetch_batches=1)
        try:
            yield from self._received(tables, reporter)
        except Exception:
            # A replica refusing to start (bad model or config) kills its actor; Ray then
            # raises ActorDiedError with the whole remote traceback: report the reason.
            start_error = ray.get(self._ledger.first_start_error.remote())
            if start_error is not None:
                raise VBatchUsageError(f"a replica could not start: {start_error}") from None
            raise
        self._refresh(reporter, state="done")

    def _received(self, tables, reporter: ProgressReporter
                  ) -> Iterator[pa.RecordBatch | WrittenParts]:
        for table in tables:
            self._received_bytes += table.nbytes
            self._received_blocks += 1
            if not self.model_info:
                self.load_time_s = time.perf_counter() - self._started
                self._refresh(reporter)
            if PART_REPORT_COLUMN in table.schema.names:
                written = WrittenParts(parse_reports(table))
                self._rows_written += written.num_rows
                reporter.update(written.num_rows, written.num_output_tokens)
                yield written
                continue
            for batch in table.combine_chunks().to_batches():
                num_rows = count_input_rows(batch)      # n samples of a row count once
                self._rows_written += num_rows
                reporter.update(num_rows, _num_output_tokens(batch))
                yield batch

    def _refresh(self, reporter, state: str = "running") -> None:
        self._ledger_snapshot = ray.get(self._ledger.snapshot.remote())
        for entry in self._ledger_snapshot:
            reporter.set_replica_state(entry["index"], state)
            self.model_info = self.model_info or entry["model"]

    def counters(self) -> list:
        """Each replica's last reported `ReplicaCounters`."""
        return [ReplicaCounters(**entry["counters"]) for entry in self._ledger_snapshot]

    def replica_stats(self) -> list[dict]:
        """Per-replica summary entries: index, node id, pid, calls, counters."""
        stats = []
        for entry in self._ledger_snapshot:
            item = {key: value for key, value in entry.items() if key not in ("model",
                                                                              "counters")}
            item["state"] = "done"
            item.update(entry["counters"])
            stats.append(item)
        return stats


def _num_output_tokens(batch: pa.RecordBatch) -> int:
    column = batch.column(NUM_GENERATED_TOKENS)
    return int(pc.sum(column).as_py() or 0)
