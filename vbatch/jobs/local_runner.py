"""The local runner: N replica processes on this node, fed from one shared work queue.

Each replica is a spawned, non-daemonic process (its engine may spawn tp x pp worker processes
of its own, which a daemon could not) that owns one `LLMEngine` through the `Replica` class,
pinned to its device group with `CUDA_VISIBLE_DEVICES` (on CPU: `VBATCH_NUM_THREADS` splits the
cores between replicas unless set). The mp executor picks a free rendezvous port per engine, so
replicas never collide.

Data flow. The driver reads input batches and puts them on one task queue shared by all
replicas; a replica takes the next batch whenever its engine has room (`Replica.process` pulls
from the queue), so a slow replica never holds the job. The driver keeps at most `prefetch`
batches waiting in the queue (replicas acknowledge each batch they take), so memory is bounded
by the batches in flight, not by the dataset. Output batches come back on one result queue and
the driver alone writes them. Every batch carries a hidden sequence-number column, added here
and dropped before writing, so the driver can check that each batch came back exactly once
with all its rows and, with `--preserve-order`, write them in input order. Batches cross the
queues as Arrow IPC bytes (`to_ipc`), never as pickled batches (see there).

Stopping. On success each replica gets a sentinel, finishes its rows, reports its counters and
exits. On any error, Ctrl-C or SIGTERM in the driver, leaving the pool sends SIGTERM to every
replica (which unwinds and shuts its engine's workers down), then SIGKILL after a grace period.
Replicas ignore SIGINT (the driver decides) and exit if the driver disappears.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
import time
import traceback
from collections.abc import Iterable, Iterator

import pyarrow as pa

from vbatch.errors import InputError, VBatchUsageError
from vbatch.jobs.config import JobConfig
from vbatch.jobs.plan import JobPlan

SEQ_COLUMN = "__vbatch_batch_seq__"
_READY, _TAKEN, _PROGRESS, _OUTPUT, _DONE, _ERROR = (
    "ready", "taken", "progress", "output", "done", "error")
_PROGRESS_INTERVAL_S = 0.5
_STOP_GRACE_S = 20.0


class ReplicaFailed(RuntimeError):
    """A replica process raised an internal error or died; the message names the replica."""


class _Stop(BaseException):
    """SIGTERM in a replica process, or its driver is gone: unwind and shut the engine down."""


def _raise_stop(signum, frame):
    raise _Stop()


# ---- replica process side ---------------------------------------------------------------------

def _replica_main(index: int, config: JobConfig, prompt_column: str, env: dict[str, str],
                  tasks, results) -> None:
    """Entry point of replica process `index`: load the engine, then process batches from
    `tasks` until a sentinel (None), sending messages to `results` (see `LocalReplicaPool`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_stop)
    os.environ.update(env)
    engine = None
    try:
        from vbatch.engine.llm_engine import LLMEngine
        from vbatch.jobs.runner import build_replica, model_info
        engine = LLMEngine(config.engine_config())
        replica = build_replica(config, engine, prompt_column)
        results.put((_READY, index, model_info(engine)))
        progress = _ProgressForwarder(results, index)
        for out_batch in replica.process(_taken_batches(tasks, results, index),
                                         on_progress=progress):
            progress.flush()
            results.put((_OUTPUT, index, to_ipc(out_batch)))
        progress.flush()
        results.put((_DONE, index, replica.counters))
    except _Stop:
        results.cancel_join_thread()     # never block the exit on a result nobody reads
    except BaseException as error:      # noqa: BLE001 - every failure is reported to the driver
        results.put((_ERROR, index, _portable_error(index, error)))
    finally:
        if engine is not None:
            engine.shutdown()


def _taken_batches(tasks, results, index: int) -> Iterator[pa.RecordBatch]:
    parent = multiprocessing.parent_process()
    while True:
        try:
            item = tasks.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                raise _Stop() from None
            continue
        if item is None:
            return
        results.put((_TAKEN, index, None))
        yield from_ipc(item)


class _ProgressForwarder:
    """`on_progress` of a replica process: sums the increments, sends them at most every
    `_PROGRESS_INTERVAL_S` seconds (and on `flush`)."""

    def __init__(self, results, index: int):
        self.results, self.index = results, index
        self.pending: list[int] = []
        self.last_sent = time.monotonic()

    def __call__(self, *increments: int) -> None:
        if len(self.pending) < len(increments):
            self.pending += [0] * (len(increments) - len(self.pending))
        for position, value in enumerate(increments):
            self.pending[position] += value
        if time.monotonic() - self.last_sent >= _PROGRESS_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        if any(self.pending):
            self.results.put((_PROGRESS, self.index, tuple(self.pending)))
            self.pending = [0] * len(self.pending)
        self.last_sent = time.monotonic()


def _portable_error(index: int, error: BaseException) -> BaseException:
    """`error` itself when it is a user error (ValueError) that pickles; else a ReplicaFailed
    with a one-line message and the replica's traceback in `remote_traceback`."""
    if isinstance(error, ValueError):
        try:
            pickle.loads(pickle.dumps(error))
            return error
        except Exception:  # noqa: BLE001 - unpicklable: send its text instead
            return VBatchUsageError(str(error))
    detail = " ".join(str(error).split())
    failed = ReplicaFailed(f"replica {index}: {type(error).__name__}: {detail}")
    failed.remote_traceback = traceback.format_exc()
    return failed


def to_ipc(batch: pa.RecordBatch) -> bytes:
    """`batch` as Arrow IPC stream bytes. Unlike pickling a RecordBatch, which ships the whole
    buffers a slice points into (a 64-row slice of a 100k-row table would carry all 100k rows),
    IPC writes only the slice's rows."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as stream:
        stream.write_batch(batch)
    return sink.getvalue().to_pybytes()


def from_ipc(payload: bytes) -> pa.RecordBatch:
    """The batch `to_ipc` wrote."""
    return pa.ipc.open_stream(payload).read_next_batch()


# ---- driver side ------------------------------------------------------------------------------

def tag_batch(batch: pa.RecordBatch, seq: int) -> pa.RecordBatch:
    """`batch` plus the hidden sequence-number column (int64, every row `seq`)."""
    if SEQ_COLUMN in batch.schema.names:
        raise InputError(f"input column {SEQ_COLUMN!r} is reserved by vbatch; rename it")
    column = pa.array([seq] * batch.num_rows, type=pa.int64())
    return batch.append_column(SEQ_COLUMN, column)


def untag_batch(batch: pa.RecordBatch) -> tuple[int | None, pa.RecordBatch]:
    """(sequence number, `batch` without the hidden column); None for a batch of zero rows."""
    index = batch.schema.get_field_index(SEQ_COLUMN)
    seq = batch.column(index)[0].as_py() if batch.num_rows else None
    return seq, batch.remove_column(index)


class LocalReplicaPool:
    """`plan.num_replicas` replica processes on this node (see module docstring). Use as a
    context manager; `outputs()` runs the job once."""

    def __init__(self, config: JobConfig, plan: JobPlan, *, prefetch: int | None = None):
        self.config, self.plan = config, plan
        self.prefetch = prefetch or max(2, plan.num_replicas)
        self._context = multiprocessing.get_context("spawn")
        self._processes: list = []
        self._tasks = self._results = None
        self._done: dict[int, object] = {}
        self._rows: dict[int, int] = {}
        self._states: dict[int, str] = {}
        self.model_info: dict = {}
        self.load_time_s = 0.0
        self._started = time.perf_counter()

    # -- lifecycle
    def __enter__(self) -> LocalReplicaPool:
        self._tasks = self._context.Queue()
        self._results = self._context.Queue()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop(graceful=exc_type is None)

    def _start(self, prompt_column: str) -> None:
        for index in range(self.plan.num_replicas):
            process = self._context.Process(
                target=_replica_main, name=f"vbatch-replica-{index}", daemon=False,
                args=(index, self.config, prompt_column, self._replica_env(index),
                      self._tasks, self._results))
            process.start()
            self._processes.append(process)
            self._states[index] = "loading"
            self._rows[index] = 0

    def _replica_env(self, index: int) -> dict[str, str]:
        env: dict[str, str] = {}
        group = self.plan.device_groups[index]
        if group:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(group)
        elif "VBATCH_NUM_THREADS" not in os.environ:
            ranks = self.plan.num_replicas * self.plan.world_size
            env["VBATCH_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
        return env

    def _stop(self, *, graceful: bool) -> None:
        deadline = time.monotonic() + (60.0 if graceful else _STOP_GRACE_S)
        for process in self._processes:
            if not graceful and process.is_alive():
                process.terminate()
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=5.0)
        for channel in (self._tasks, self._results):
            if channel is not None:
                channel.cancel_join_thread()
                channel.close()

    # -- the job
    def outputs(self, job, reporter) -> Iterator[pa.RecordBatch]:
        """Start the replicas, feed them `job`'s input batches, yield output batches (input
        order with `preserve_order`, else completion order). Raises the first replica error."""
        from vbatch.io import reader

        self._start(job.prompt_column)
        batches = reader.read_batches(job.files, batch_size=self.config.batch_size,
                                      prompt_column=self.config.prompt_column,
                                      id_column=self.config.id_column, root=job.root,
                                      scan=job.scan, with_positions=True, skip=job.skip)
        yield from self._run(batches, reporter)

    def _run(self, batches: Iterable[pa.RecordBatch], reporter) -> Iterator[pa.RecordBatch]:
        source = enumerate(batches)
        outstanding: dict[int, int] = {}       # seq -> rows, sent but not yet back
        finished: dict[int, pa.RecordBatch] = {}  # preserve_order: back, waiting for earlier
        next_to_yield = 0
        waiting = 0
        is_exhausted = False
        while len(self._done) < len(self._processes):
            while not is_exhausted and waiting < self.prefetch:
                item = next(source, None)
                if item is None:
                    is_exhausted = True
                    for _ in self._processes:
                        self._tasks.put(None)
                    break
                seq, batch = item
                self._tasks.put(to_ipc(tag_batch(batch, seq)))
                outstanding[seq] = batch.num_rows
                waiting += 1
            kind, index, payload = self._receive()
            if kind == _TAKEN:
                waiting -= 1
            elif kind == _PROGRESS:
                reporter.update(*payload)
            elif kind == _READY:
                self.model_info = self.model_info or payload
                self.load_time_s = max(self.load_time_s, time.perf_counter() - self._started)
                self._set_state(reporter, index, "running")
            elif kind == _DONE:
                self._done[index] = payload
                self._set_state(reporter, index, "done")
            elif kind == _ERROR:
                raise payload
            elif kind == _OUTPUT:
                seq, out_batch = untag_batch(from_ipc(payload))
                if seq is None:
                    continue
                if outstanding.pop(seq, None) != out_batch.num_rows:
                    raise ReplicaFailed(f"replica {index} returned batch {seq} with "
                                        f"{out_batch.num_rows} rows, not the rows sent once")
                self._rows[index] += out_batch.num_rows
                if not self.config.preserve_order:
                    yield out_batch
                    continue
                finished[seq] = out_batch
                while next_to_yield in finished:
                    yield finished.pop(next_to_yield)
                    next_to_yield += 1
        if outstanding:
            raise ReplicaFailed(f"replicas finished but {len(outstanding)} batch(es) never came "
                                "back")

    def _set_state(self, reporter, index: int, state: str) -> None:
        self._states[index] = state
        reporter.set_replica_state(index, state)

    def _receive(self) -> tuple:
        """The next message from any replica; raises ReplicaFailed when a replica that has not
        finished is dead and left no message behind."""
        while True:
            try:
                return self._results.get(timeout=1.0)
            except queue.Empty:
                pass
            for index, process in enumerate(self._processes):
                if index in self._done or process.is_alive():
                    continue
                try:        # its last messages may still be in the pipe
                    return self._results.get(timeout=2.0)
                except queue.Empty:
                    raise ReplicaFailed(f"replica {index} died (exit code {process.exitcode})"
                                        ) from None

    def counters(self) -> list:
        """Each replica's final `ReplicaCounters` (after `outputs` is exhausted)."""
        return [self._done[index] for index in sorted(self._done)]

    def replica_stats(self) -> list[dict]:
        """Per-replica summary entries: index, state, device group, pid, rows, counters."""
        import dataclasses

        stats = []
        for index, process in enumerate(self._processes):
            counters = self._done.get(index)
            entry = {"index": index, "state": self._states.get(index, "unknown"),
                     "device_group": list(self.plan.device_groups[index]),
                     "pid": process.pid, "rows_written": self._rows.get(index, 0)}
            if counters is not None:
                entry.update(dataclasses.asdict(counters))
            stats.append(entry)
        return stats
