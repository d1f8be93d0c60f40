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
Memory is bounded by the batches in flight, not by the dataset. Replicas send finished rows
back as they finish (a few output batches a second, jobs/replica.py), and the driver alone
writes them. Every batch carries hidden tags (jobs/batch_order.py: sequence number, row index),
added here and dropped before writing, so the driver knows which rows of which batch are back
(each exactly once, checked) and, with `--preserve-order`, writes rows in input order (holding
back at most `_ORDER_WINDOW_PER_REPLICA` batches per replica beyond the first unfinished row:
no batch past that window is handed out). While nothing comes back the driver still yields
(an empty batch every second at least), so the job can commit on time.

Each replica answers on its own result pipe, so a replica killed in the middle of a message garbles
nothing but its own pipe, which is dropped with it. Failures. A replica that dies (SIGKILL, OOM) or
raises an internal error is replaced by a new process (at most `--max-replica-restarts` times per
replica, then the job fails naming it), and the rows it held but had not sent back go, as a
sub-batch of each batch (`batch.take`), to the front of the queue for the live replicas; rows it
already sent back are not computed again. Whatever the dead process still had in its pipe is
dropped with the pipe, so every row comes back once. A user error (ValueError: a bad model, say)
fails the job at once: a restart would fail the same way.

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
from dataclasses import dataclass
from multiprocessing.connection import wait

import numpy as np
import pyarrow as pa

from vbatch.env import NUM_THREADS
from vbatch.jobs.batch_order import (
    IDLE_INTERVAL_S,
    InputOrder,
    idle_batch,
    tag_batch,
    untag_batch,
)
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
#: With --preserve-order: batches handed out beyond the first one not yet written, per replica
#: (bounds the rows held back for order; enough to keep every engine busy).
_ORDER_WINDOW_PER_REPLICA = 4


@dataclass
class _Task:
    """One input batch handed to a replica: its rows not yet back (tagged, a sub-batch of the
    original after a retry) and their row indices."""

    batch: pa.RecordBatch
    remaining: set[int]

    @classmethod
    def of(cls, batch: pa.RecordBatch) -> _Task:
        """The task of a tagged batch, all of its rows to come back."""
        _, rows, _ = untag_batch(batch)
        return cls(batch, set(rows.tolist()))

    def rest(self) -> _Task:
        """The rows not yet back, as a task of their own (tags kept)."""
        _, rows, _ = untag_batch(self.batch)
        keep = np.flatnonzero(np.isin(rows, np.fromiter(self.remaining, np.int64)))
        return _Task(self.batch.take(pa.array(keep, pa.int64())), set(self.remaining))


class _Slot:
    """One replica index: its current process, task queue, and the batches it holds."""

    def __init__(self, index: int):
        self.index = index
        self.process = None
        self.tasks = None
        self.results = None                   # the read end of its result pipe
        self.wid = -1
        self.held: dict[int, _Task] = {}      # seq -> its rows not yet back
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
        self._next_seq = 0
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
        source = iter(batches)
        retry: deque[tuple[int, _Task]] = deque()  # failed replicas' rows not yet back
        in_order = InputOrder() if self.config.preserve_order else None
        is_exhausted = False
        last_yield = time.monotonic()
        while not all(slot.is_done for slot in self._slots):
            if time.monotonic() - last_yield >= IDLE_INTERVAL_S:
                last_yield = time.monotonic()
                yield idle_batch()
            self._dispatch(source, retry, is_exhausted, in_order)
            if not is_exhausted and not retry and self._source_drained:
                is_exhausted = True
            if is_exhausted and not retry and not self._is_stopping \
                    and not any(slot.held for slot in self._slots):
                self._is_stopping = True            # every row is back: let them finish
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
                seq, rows, out_batch = untag_batch(from_ipc(payload))
                if seq is None:
                    continue
                self._check_back(slot, seq, rows)
                if in_order is None:
                    last_yield = time.monotonic()
                    yield out_batch
                    continue
                for due in in_order.release(seq, rows, out_batch):
                    last_yield = time.monotonic()
                    yield due
        if (in_order is not None and in_order.num_held) or retry \
                or any(slot.held for slot in self._slots):
            raise ReplicaFailed("replicas finished but some rows never came back")

    def _check_back(self, slot: _Slot, seq: int, rows: np.ndarray) -> None:
        """Record rows `rows` of batch `seq` as back from `slot`. Only a live replica's own
        pipe is read, so rows come back from the replica that holds them; each exactly once
        (checked: a replica returning rows it does not hold is a bug, never written twice)."""
        task = slot.held.get(seq)
        back = set(np.unique(rows).tolist())
        if task is None or not back <= task.remaining:
            raise ReplicaFailed(f"replica {slot.index} returned rows of batch {seq} that it "
                                "does not hold (not sent, or already back)")
        task.remaining -= back
        if not task.remaining:
            del slot.held[seq]
        self._rows[slot.index] += len(back)          # n samples of a row count once

    def _dispatch(self, source, retry: deque, is_exhausted: bool,
                  in_order: InputOrder | None) -> None:
        """Send batches (retries first) to the live replicas with room, fewest waiting first;
        with `in_order`, no new batch past its window."""
        window = _ORDER_WINDOW_PER_REPLICA * len(self._slots)
        while True:
            live = [slot for slot in self._slots if not slot.is_retired and not slot.is_done
                    and slot.num_waiting < self.prefetch_per_replica]
            if not live:
                return
            if retry:
                seq, task = retry.popleft()
            elif not is_exhausted and not self._source_drained:
                if in_order is not None and self._next_seq >= in_order.next_seq + window:
                    return
                batch = next(source, None)
                if batch is None:
                    self._source_drained = True
                    return
                if not batch.num_rows:
                    continue
                seq, self._next_seq = self._next_seq, self._next_seq + 1
                if in_order is not None:
                    in_order.expect(seq, batch.num_rows)
                task = _Task.of(tag_batch(batch, seq))
            else:
                return
            slot = min(live, key=lambda s: (s.num_waiting, len(s.held)))
            slot.held[seq] = task
            slot.num_waiting += 1
            slot.tasks.put((seq, to_ipc(task.batch)))

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
        # Only the rows it had not sent back: those it did were written already.
        retry.extendleft(sorted(((seq, task.rest()) for seq, task in slot.held.items()),
                                reverse=True, key=lambda item: item[0]))
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
