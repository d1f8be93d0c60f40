"""The local runner: N replica processes on this node, fed through a work queue, restarted
when they die.

Each replica is a spawned, non-daemonic process (`jobs/replica_process.py`; its engine may
spawn tp x pp worker processes of its own, which a daemon could not) that owns one `LLMEngine`
through the `Replica` class, pinned to its device group with `CUDA_VISIBLE_DEVICES` (on CPU:
`VBATCH_NUM_THREADS` splits the cores between replicas unless set). The mp executor picks a
free rendezvous port per engine, so replicas never collide.

Data flow. The driver reads input batches and hands each to the replica with the fewest
batches waiting (each has its own task queue, at most `prefetch_per_replica` waiting), so a
slow replica never holds the job and the driver always knows which replica holds which batch.
Memory is bounded by the batches in flight, not by the dataset. Output batches come back on one
result queue and the driver alone writes them. Every batch carries a hidden sequence-number
column, added here and dropped before writing, so the driver can check that each batch came
back once with all its rows and, with `--preserve-order`, write them in input order.

Each replica answers on its own result pipe, so a replica killed in the middle of a message garbles
nothing but its own pipe, which is dropped with it. Failures. A replica that dies (SIGKILL, OOM) or
raises an internal error is replaced by a new process (at most `--max-replica-restarts` times per
replica, then the job fails naming it), and the batches it held go back to the front of the queue
for the live replicas; whatever the dead process still had in its pipe is dropped with the pipe, so
every batch comes back once. A user error (ValueError: a bad model, say) fails the job at once: a
restart would fail the same way.

Stopping. On success each replica gets a sentinel, reports its counters and exits. On any
error, Ctrl-C or SIGTERM in the driver, leaving the pool sends SIGTERM to every replica (which
unwinds and shuts its engine's workers down), then SIGKILL after a grace period.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from multiprocessing.connection import wait

import pyarrow as pa

from vbatch.env import NUM_THREADS
from vbatch.io.schema import count_input_rows
from vbatch.jobs.batch_order import InputOrder, tag_batch, untag_batch
from vbatch.jobs.config import JobConfig
from vbatch.jobs.job_inputs import JobInputs
from vbatch.jobs.plan import JobPlan
from vbatch.jobs.progress import ProgressReporter
from vbatch.jobs.replica_process import (
    DONE,
    ERROR,
    OUTPUT,
    PROGRESS,
    READY,
    TAKEN,
    ReplicaFailed,
    from_ipc,
    replica_main,
    to_ipc,
)

_STOP_GRACE_S = 20.0


class _Slot:
    """One replica index: its current process, task queue, and the batches it holds."""

    def __init__(self, index: int):
        self.index = index
        self.process = None
        self.tasks = None
        self.results = None                   # the read end of its result pipe
        self.wid = -1
        self.held: dict[int, tuple[bytes, int]] = {}  # seq -> (payload, rows), not yet back
        self.num_waiting = 0                  # sent, not yet taken into the engine
        self.num_restarts = 0
        self.is_done = False
        self.is_retired = False               # its process failed and is being replaced


class LocalReplicaPool:
    """`plan.num_replicas` replica processes on this node (see module docstring). Use as a
    context manager; `outputs()` runs the job once."""

    def __init__(self, config: JobConfig, plan: JobPlan, *, started: float,
                 prefetch_per_replica: int = 2):
        self.config, self.plan = config, plan
        self.prefetch_per_replica = prefetch_per_replica
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(index) for index in range(plan.num_replicas)]
        self._next_wid = 0
        self._prompt_column = ""
        self._done: dict[int, object] = {}
        self._rows: dict[int, int] = {}
        self._states: dict[int, str] = {}
        self.model_info: dict = {}
        self.load_time_s = 0.0
        self.num_restarts = 0
        self._source_drained = False
        self._is_stopping = False
        self._started = started

    # -- lifecycle
    def __enter__(self) -> LocalReplicaPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop(graceful=exc_type is None)

    def _start(self, slot: _Slot, reporter=None) -> None:
        """Start (or restart) the process of `slot` with a fresh task queue."""
        self._close_channels(slot)
        slot.tasks = self._context.Queue()
        slot.results, writer = self._context.Pipe(duplex=False)
        slot.wid, self._next_wid = self._next_wid, self._next_wid + 1
        slot.is_retired = False
        slot.num_waiting = 0
        slot.process = self._context.Process(
            target=replica_main, name=f"vbatch-replica-{slot.index}", daemon=False,
            args=(slot.wid, slot.index, self.config, self._prompt_column,
                  self._replica_env(slot.index), slot.tasks, writer))
        slot.process.start()
        writer.close()                        # the child holds the only write end
        self._rows.setdefault(slot.index, 0)
        self._set_state(reporter, slot.index, "loading")

    def _replica_env(self, index: int) -> dict[str, str]:
        env: dict[str, str] = {}
        group = self.plan.device_groups[index]
        if group:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(group)
        elif NUM_THREADS.read() is None:
            ranks = self.plan.num_replicas * self.plan.world_size
            env["VBATCH_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
        return env

    def _stop(self, *, graceful: bool) -> None:
        deadline = time.monotonic() + (60.0 if graceful else _STOP_GRACE_S)
        processes = [slot.process for slot in self._slots if slot.process is not None]
        for process in processes:
            if not graceful and process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=5.0)
        for slot in self._slots:
            self._close_channels(slot)

    @staticmethod
    def _close_channels(slot: _Slot) -> None:
        if slot.tasks is not None:
            slot.tasks.cancel_join_thread()
            slot.tasks.close()
        if slot.results is not None:
            slot.results.close()
        slot.tasks = slot.results = None

    # -- the job
    def outputs(self, job: JobInputs, reporter: ProgressReporter) -> Iterator[pa.RecordBatch]:
        """Start the replicas, feed them `job`'s input batches, yield output batches (input
        order with `preserve_order`, else completion order). Raises the first user error, or
        ReplicaFailed once a replica has failed more than `max_replica_restarts` times."""
        self._prompt_column = job.prompt_column
        reporter.start(job.total_rows)
        for slot in self._slots:
            self._start(slot, reporter)
        yield from self._run(job.batches(self.config), reporter)

    def _run(self, batches: Iterable[pa.RecordBatch], reporter) -> Iterator[pa.RecordBatch]:
        source = enumerate(batches)
        retry: deque[tuple[int, tuple[bytes, int]]] = deque()  # failed replicas' batches
        in_order = InputOrder()                  # preserve_order: back, waiting for earlier
        is_exhausted = False
        while not all(slot.is_done for slot in self._slots):
            self._dispatch(source, retry, is_exhausted)
            if not is_exhausted and not retry and self._source_drained:
                is_exhausted = True
            if is_exhausted and not retry and not self._is_stopping \
                    and not any(slot.held for slot in self._slots):
                self._is_stopping = True            # every batch is back: let them finish
                for slot in self._slots:
                    if not slot.is_done:
                        slot.tasks.put(None)
            kind, slot, payload = self._receive(retry, reporter)
            if slot is None:
                continue
            if kind == TAKEN:
                slot.num_waiting -= 1
            elif kind == PROGRESS:
                reporter.update(*payload)
            elif kind == READY:
                self.model_info = self.model_info or payload
                self.load_time_s = max(self.load_time_s, time.perf_counter() - self._started)
                self._set_state(reporter, slot.index, "running")
            elif kind == DONE:
                slot.is_done = True
                self._done[slot.index] = payload
                self._set_state(reporter, slot.index, "done")
            elif kind == ERROR:
                if isinstance(payload, ValueError):
                    raise payload                   # the user's: a restart fails the same way
                cause = str(payload).removeprefix(f"replica {slot.index}: ")
                self._replace(slot, retry, reporter, f"failed ({cause})")
            elif kind == OUTPUT:
                seq, out_batch = untag_batch(from_ipc(payload))
                if seq is None:
                    continue
                # Only a live replica's own pipe is read, so a batch comes back from the
                # replica that holds it, exactly once.
                expected = slot.held.pop(seq, (None, None))[1]
                num_rows = count_input_rows(out_batch)      # n samples of a row count once
                if expected != num_rows:
                    raise ReplicaFailed(f"replica {slot.index} returned batch {seq} with "
                                        f"{num_rows} rows, not the rows sent")
                self._rows[slot.index] += num_rows
                if not self.config.preserve_order:
                    yield out_batch
                    continue
                yield from in_order.release(seq, out_batch)
        if in_order.num_held or retry or any(slot.held for slot in self._slots):
            raise ReplicaFailed("replicas finished but some batches never came back")

    def _dispatch(self, source, retry: deque, is_exhausted: bool) -> None:
        """Send batches (retries first) to the live replicas with room, fewest waiting first."""
        while True:
            live = [slot for slot in self._slots if not slot.is_retired and not slot.is_done
                    and slot.num_waiting < self.prefetch_per_replica]
            if not live:
                return
            if retry:
                seq, task = retry.popleft()
            elif not is_exhausted and not self._source_drained:
                item = next(source, None)
                if item is None:
                    self._source_drained = True
                    return
                seq, batch = item
                task = (to_ipc(tag_batch(batch, seq)), batch.num_rows)
            else:
                return
            slot = min(live, key=lambda s: (s.num_waiting, len(s.held)))
            slot.held[seq] = task
            slot.num_waiting += 1
            slot.tasks.put((seq, task[0]))

    def _replace(self, slot: _Slot, retry: deque, reporter, cause: str) -> None:
        """Retire `slot`'s failed process, queue its batches again, start a new one."""
        slot.is_retired = True
        self._close_channels(slot)            # its late messages are dropped with the pipe
        if slot.process.is_alive():
            slot.process.terminate()
            slot.process.join(timeout=_STOP_GRACE_S)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join(timeout=5.0)
        retry.extendleft(sorted(slot.held.items(), reverse=True))
        slot.held = {}
        if self._is_stopping:      # all batches were back: nothing left for it to do
            slot.is_done = True
            self._set_state(reporter, slot.index, "done")
            return
        if slot.num_restarts >= self.config.max_replica_restarts:
            raise ReplicaFailed(f"replica {slot.index} {cause}; it was restarted "
                                f"{slot.num_restarts} times (--max-replica-restarts "
                                f"{self.config.max_replica_restarts}); giving up")
        slot.num_restarts += 1
        self.num_restarts += 1
        self._set_state(reporter, slot.index, "restarting")
        self._start(slot, reporter)

    def _set_state(self, reporter, index: int, state: str) -> None:
        self._states[index] = state
        if reporter is not None:
            reporter.set_replica_state(index, state)

    def _receive(self, retry: deque, reporter) -> tuple:
        """(kind, slot, payload) of the next message from a live replica, or (None, None,
        None) after replacing a replica that died (its pipe closed or its process exited with
        nothing left to read) or when a second passed quietly."""
        live = [slot for slot in self._slots if not slot.is_done and not slot.is_retired]
        readers = {slot.results: slot for slot in live}
        sentinels = {slot.process.sentinel: slot for slot in live}
        for ready in wait(list(readers) + list(sentinels), timeout=1.0):
            slot = readers.get(ready)
            if slot is not None:
                try:
                    kind, _wid, payload = slot.results.recv()
                except (EOFError, OSError):
                    self._replace(slot, retry, reporter, "died (its result pipe closed)")
                    return None, None, None
                return kind, slot, payload
            slot = sentinels[ready]
            if not slot.results.poll():      # exited and said all it had to say
                slot.process.join(timeout=1.0)
                self._replace(slot, retry, reporter,
                              f"died (exit code {slot.process.exitcode})")
                return None, None, None
        return None, None, None

    def counters(self) -> list:
        """Each replica's final `ReplicaCounters` (after `outputs` is exhausted)."""
        return [self._done[index] for index in sorted(self._done)]

    def replica_stats(self) -> list[dict]:
        """Per-replica summary entries: index, state, device group, pid, rows, counters."""
        stats = []
        for slot in self._slots:
            index = slot.index
            counters = self._done.get(index)
            entry = {"index": index, "state": self._states.get(index, "unknown"),
                     "device_group": list(self.plan.device_groups[index]),
                     "pid": slot.process.pid if slot.process else None,
                     "restarts": slot.num_restarts, "rows_written": self._rows.get(index, 0)}
            if counters is not None:
                entry.update(dataclasses.asdict(counters))
            stats.append(entry)
        return stats
