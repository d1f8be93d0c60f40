"""The replica-process side of the local runner: one spawned process, one engine.

A replica process loads its `LLMEngine` (through `Replica`), then takes (seq, batch) tasks from
its own task queue whenever its engine has room and sends messages on its own result pipe
(one writer per pipe: a process killed mid-message can only garble its own pipe, which the
driver drops with it), each tagged with the process's worker id `wid`:

    (READY, wid, model_info)        the engine is loaded
    (TAKEN, wid, seq)               batch `seq` entered the engine
    (PROGRESS, wid, increments)     rows / output tokens / error rows finished since last time
    (OUTPUT, wid, ipc bytes)        finished rows of one input batch, as they finish (with
                                    the hidden batch tags, jobs/batch_order.py)
    (DONE, wid, counters)           the sentinel (None) arrived and everything is out
    (ERROR, wid, exception)         it failed; a ValueError is the user's, anything else ours

SIGTERM unwinds it (its engine's worker processes are shut down on the way out); SIGINT is
ignored (the driver decides); it stops by itself when the driver process is gone.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
import time
import traceback
from collections.abc import Iterator

import pyarrow as pa

from vbatch.errors import VBatchUsageError, one_line
from vbatch.jobs.config import JobConfig
from vbatch.jobs.replica import NO_BATCH_YET
from vbatch.jobs.signals import redeliver_stop_signals

READY, TAKEN, PROGRESS, OUTPUT, DONE, ERROR = (
    "ready", "taken", "progress", "output", "done", "error")
_PROGRESS_INTERVAL_S = 0.5


class ReplicaFailed(RuntimeError):
    """A replica process raised an internal error or died; the message names the replica."""


class _Stop(BaseException):
    """SIGTERM in a replica process, or its driver is gone: unwind and shut the engine down."""


def _raise_stop(signum, frame):
    raise _Stop()


def replica_main(wid: int, index: int, config: JobConfig, prompt_column: str,
                 env: dict[str, str], tasks, results) -> None:
    """Entry point of replica `index` (worker id `wid`): load the engine, then process tasks
    until the sentinel, reporting on the `results` connection (see module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        try:
            with redeliver_stop_signals({_Stop: signal.SIGTERM}):
                _serve(wid, index, config, prompt_column, env, tasks, results)
        finally:
            # From here the process only exits: a late SIGTERM (the driver stopping every
            # replica) must end it quietly, not raise _Stop in the interpreter's exit handlers.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except _Stop:            # SIGTERM at any point (even while reporting an error): just stop
        pass


def _serve(wid: int, index: int, config: JobConfig, prompt_column: str, env: dict[str, str],
           tasks, results) -> None:
    os.environ.update(env)
    engine = None
    try:
        # Imported here, after the replica's environment (CUDA_VISIBLE_DEVICES, thread count)
        # is set, and inside the try so that a broken install is reported to the driver.
        from vbatch.jobs.replica_engine import model_info, start_replica  # noqa: PLC0415 - imported after the env is set
        replica = start_replica(config, prompt_column)
        engine = replica.engine
        results.send((READY, wid, model_info(engine)))
        progress = _ProgressForwarder(results, wid)
        source = _taken_batches(tasks, results, wid, engine.has_unfinished_requests)
        for out_batch in replica.process(source, on_progress=progress):
            progress.flush()
            results.send((OUTPUT, wid, to_ipc(out_batch)))
        progress.flush()
        results.send((DONE, wid, replica.counters))
    except _Stop:
        raise
    except BaseException as error:      # noqa: BLE001 - every failure is reported to the driver
        try:
            results.send((ERROR, wid, portable_error(index, error)))
        except OSError:                  # the driver is gone
            pass
    finally:
        if engine is not None:
            engine.shutdown()


def _taken_batches(tasks, results, wid: int, engine_is_busy) -> Iterator:
    """The batches sent to this replica; `NO_BATCH_YET` when none is waiting while the engine
    still has rows to step (blocking then would stall them)."""
    parent = multiprocessing.parent_process()
    while True:
        try:
            item = tasks.get_nowait() if engine_is_busy() else tasks.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                raise _Stop() from None
            if engine_is_busy():
                yield NO_BATCH_YET
            continue
        if item is None:
            return
        seq, payload = item
        results.send((TAKEN, wid, seq))
        yield from_ipc(payload)


class _ProgressForwarder:
    """`on_progress` of a replica process: sums the increments, sends them at most every
    `_PROGRESS_INTERVAL_S` seconds (and on `flush`)."""

    def __init__(self, results, wid: int):
        self.results, self.wid = results, wid
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
            self.results.send((PROGRESS, self.wid, tuple(self.pending)))
            self.pending = [0] * len(self.pending)
        self.last_sent = time.monotonic()


def portable_error(index: int, error: BaseException) -> BaseException:
    """`error` itself when it is a user error (ValueError) that pickles; else a ReplicaFailed
    with a one-line message and the replica's traceback in `remote_traceback`."""
    if isinstance(error, ValueError):
        try:
            pickle.loads(pickle.dumps(error))
            return error
        except Exception:  # noqa: BLE001 - unpicklable: send its text instead
            return VBatchUsageError(str(error))
    failed = ReplicaFailed(f"replica {index}: {type(error).__name__}: {one_line(str(error))}")
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
