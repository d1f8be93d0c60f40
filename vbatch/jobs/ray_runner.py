"""The Ray runner: a Ray Data pipeline of input blocks through a pool of replica actors.

    read_datasource(InputDatasource)            one read task per input file, streaming the
                                                file through vbatch's own reader
      -> map_batches(ReplicaActor, concurrency=N)  each actor owns one LLMEngine via `Replica`
      -> iter_batches() in the driver           written by our ParquetPartWriter (not
                                                ray's write_parquet: we keep our commit protocol)

Reading goes through `io/reader.py` inside Ray read tasks (not `ray.data.read_json/read_csv`)
so that the rows, their types (unified across files) and the derived row keys
(`<file>:<row>`) are exactly those of the local runner. Ray Data streams blocks with
backpressure, so memory is bounded by the blocks in flight. Read tasks run on the driver's node
(where the inputs were checked; other nodes need not see the files) and reserve no CPU: the
replica actors may hold every CPU of a node.

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
output is the same on every attempt. The pool still yields a batch of zero rows every
`IDLE_INTERVAL_S` while no block arrives, so the job commits buffered rows on time.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import DataContext, Datasource, ReadTask
from ray.data.block import BlockMetadata

from vbatch.engine.executor import ray_cluster
from vbatch.env import NUM_THREADS
from vbatch.io.input_file import default_root, file_size
from vbatch.io.positions import POSITION_COLUMN
from vbatch.io.reader import InputScan, read_batches
from vbatch.io.schema import NUM_GENERATED_TOKENS, SAMPLE_INDEX, count_input_rows
from vbatch.jobs.batch_order import IDLE_INTERVAL_S, idle_batch
from vbatch.jobs.config import JobConfig
from vbatch.jobs.job_inputs import JobInputs
from vbatch.jobs.plan import JobPlan
from vbatch.jobs.progress import ProgressReporter
from vbatch.jobs.replica import ReplicaCounters
from vbatch.jobs.replica_engine import model_info, start_replica

#: How long Ray may take to start every replica actor (resources, model load) before the job
#: fails with Ray's "not enough resources for the requested actor pool".
ACTOR_START_TIMEOUT_S = 900


class InputDatasource(Datasource):
    """The job's input files as a Ray Data source: one read task per file, each streaming that
    file with `reader.read_batches` (same batches, schema and row keys as the local runner)."""

    def __init__(self, config: JobConfig, job):
        super().__init__()
        self.config = config
        self.files = [path for path, schema in job.scan.file_schemas.items() if schema]
        self.file_schemas = job.scan.file_schemas
        # Positions number the files as the local reader does (io/positions.py).
        self.file_indices = {path: index for index, path in enumerate(job.scan.file_schemas)}
        self.skip = job.skip
        self.schema = job.scan.schema
        self.root = job.root if job.root is not None else default_root(self.files)

    @property
    def supports_distributed_reads(self) -> bool:
        """False: read on the driver's node, where the inputs were checked (other nodes need
        not see the files); blocks reach the replicas through the object store."""
        return False

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(file_size(path) for path in self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None,
                       data_context=None) -> list[ReadTask]:
        tasks = []
        for path in self.files:
            metadata = BlockMetadata(num_rows=None, size_bytes=file_size(path),
                                     exec_stats=None, input_files=[str(path)])
            tasks.append(ReadTask(self._reader(path), metadata, schema=self.schema,
                                  per_task_row_limit=per_task_row_limit))
        return tasks

    def _reader(self, path):
        config, root, skip = self.config, self.root, self.skip
        scan = InputScan({path: self.file_schemas[path]}, self.schema)
        file_index = self.file_indices[path]

        def read() -> Iterator[pa.Table]:
            for batch in read_batches([path], batch_size=config.batch_size,
                                      prompt_column=config.prompt_column,
                                      id_column=config.id_column, root=root, scan=scan,
                                      with_positions=True, skip=skip,
                                      first_file_index=file_index):
                yield pa.Table.from_batches([batch])
        return read


class ReplicaLedger:
    """Where replica actors register (getting their index) and report their counters."""

    def __init__(self):
        self.replicas: list[dict] = []

    def register(self, node_id: str, pid: int, model: dict, counters: dict) -> int:
        self.replicas.append({"index": len(self.replicas), "node_id": node_id, "pid": pid,
                              "model": model, "state": "running", "num_calls": 0,
                              "counters": counters})
        return len(self.replicas) - 1

    def report(self, index: int, counters: dict) -> None:
        entry = self.replicas[index]
        entry["num_calls"] += 1
        entry["counters"] = counters

    def snapshot(self) -> list[dict]:
        return [dict(entry) for entry in self.replicas]


class ReplicaActor:
    """One replica as a Ray Data callable class: loads the engine once, then turns each input
    block into its output block (`Replica.process` on that block's batches)."""

    def __init__(self, config: JobConfig, prompt_column: str, input_schema: pa.Schema,
                 ledger, num_threads: int | None):
        if num_threads and NUM_THREADS.read() is None:
            os.environ[NUM_THREADS.name] = str(num_threads)
        self.input_schema = input_schema
        self.replica = start_replica(config, prompt_column)
        self.engine = self.replica.engine
        self.ledger = ledger
        node_id = ray.get_runtime_context().get_node_id()
        self.index = ray.get(ledger.register.remote(
            node_id, os.getpid(), model_info(self.engine),
            dataclasses.asdict(self.replica.counters)))

    def __call__(self, table: pa.Table) -> pa.Table:
        if not table.schema.equals(self.input_schema):
            table = table.select(self.input_schema.names).cast(self.input_schema)
        outputs = list(self.replica.process(table.combine_chunks().to_batches()))
        ray.get(self.ledger.report.remote(self.index, dataclasses.asdict(self.replica.counters)))
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

    def outputs(self, job: JobInputs, reporter: ProgressReporter) -> Iterator[pa.RecordBatch]:
        """Run the pipeline; yield output batches (input order with `preserve_order`)."""
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
        dataset = ray.data.read_datasource(InputDatasource(self.config, job), num_cpus=0)
        pool = ray.data.ActorPoolStrategy(size=self.plan.num_replicas,
                                          max_tasks_in_flight_per_actor=2)
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
                                   "num_threads": None if on_gpu else 1},
            **resources)
        for index in range(self.plan.num_replicas):
            reporter.set_replica_state(index, "loading")
        tables = dataset.iter_batches(batch_size=None, batch_format="pyarrow",
                                      prefetch_batches=1)
        for table in _with_idle_batches(tables, IDLE_INTERVAL_S):
            if table is None:
                yield idle_batch()
                continue
            if not self.model_info:
                self.load_time_s = time.perf_counter() - self._started
                self._refresh(reporter)
            for batch in table.combine_chunks().to_batches():
                num_rows = count_input_rows(batch)      # n samples of a row count once
                self._rows_written += num_rows
                reporter.update(num_rows, _num_output_tokens(batch))
                yield batch
        self._refresh(reporter, state="done")

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


def _with_idle_batches(items: Iterator, interval_s: float) -> Iterator:
    """`items`, pulled by a helper thread, with a None whenever `interval_s` passes without
    one (Ray's iterator blocks until a block arrives); its exception is raised here."""
    handoff: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def pull() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        handoff.put((True, item), timeout=interval_s)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            handoff.put((False, None))
        except BaseException as error:      # noqa: BLE001 - handed to the consumer
            handoff.put((False, error))

    threading.Thread(target=pull, name="vbatch-ray-outputs", daemon=True).start()
    try:
        while True:
            try:
                is_item, value = handoff.get(timeout=interval_s)
            except queue.Empty:
                yield None
                continue
            if not is_item:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()


def _num_output_tokens(batch: pa.RecordBatch) -> int:
    column = batch.column(NUM_GENERATED_TOKENS)
    return int(pc.sum(column).as_py() or 0)
