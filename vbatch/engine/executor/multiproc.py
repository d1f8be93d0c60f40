"""The `mp` executor: one spawned worker process per rank, driven over pipes.

The engine process holds no model. Every step it sends the same (method, args) message to each
rank's pipe; the ranks run it in lockstep (their collectives meet in torch.distributed, gloo on
CPU or NCCL on CUDA), and each sends back its result, or the error it raised. A rank that dies
is noticed through its process sentinel, so the engine fails within seconds naming the rank,
instead of hanging in a collective. The ranks meet through a file store in a private temporary
directory (removed on shutdown) and their sockets bind to loopback: the engine opens no port
to the network (`parallel/rendezvous.py`). Ray is not imported.
"""
from __future__ import annotations

import multiprocessing
import os
import traceback
from multiprocessing.connection import wait

import torch.distributed as dist

from vbatch.engine.executor.base import Executor, PendingResult, WorkerError
from vbatch.engine.worker import WorkerSpec, start_worker
from vbatch.parallel.rendezvous import LocalRendezvous

__all__ = ["MultiprocExecutor", "WorkerError"]

_SHUTDOWN = "__shutdown__"


def _worker_main(rank: int, spec: WorkerSpec, tp_size: int, pp_size: int, init_method: str,
                 conn, visible_devices: str | None) -> None:
    """Entry point of a worker process: build this rank, then serve (method, args) messages."""
    if visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    try:
        worker = start_worker(spec, world_rank=rank, tp_size=tp_size, pp_size=pp_size,
                              init_method=init_method, single_node=True)
        conn.send(("ok", None))
    except BaseException as error:  # report, then exit: the engine raises WorkerError
        conn.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
        return
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):      # the engine process is gone: leave quietly
            break
        if method == _SHUTDOWN:
            break
        try:
            conn.send(("ok", getattr(worker, method)(*args)))
        except BaseException as error:
            conn.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    if dist.is_initialized():
        dist.destroy_process_group()


class MultiprocExecutor(Executor):
    """tp_size x pp_size worker processes on this node (see module docstring)."""

    def __init__(self, spec: WorkerSpec, *, tp_size: int, pp_size: int = 1):
        self.world_size = tp_size * pp_size
        context = multiprocessing.get_context("spawn")
        self._rendezvous = LocalRendezvous()
        init_method = self._rendezvous.init_method
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.processes, self.conns = [], []
        self._num_submitted = self._num_collected = 0
        self._collected: dict[int, list] = {}
        try:
            for rank in range(self.world_size):
                parent_conn, child_conn = context.Pipe()
                process = context.Process(
                    target=_worker_main, name=f"vbatch-worker-{rank}", daemon=True,
                    args=(rank, spec, tp_size, pp_size, init_method, child_conn, visible))
                process.start()
                child_conn.close()
                self.processes.append(process)
                self.conns.append(parent_conn)
            self._collect()              # every rank reports that it loaded its shard
        except BaseException:
            self.shutdown()
            raise

    def submit(self, method: str, *args) -> PendingResult:
        if not self.conns:
            raise WorkerError("the workers were shut down after an earlier failure")
        for rank, conn in enumerate(self.conns):
            try:
                conn.send((method, args))
            except OSError:
                code = self.processes[rank].exitcode
                self.shutdown()
                raise WorkerError(f"worker rank {rank} died (exit code {code})") from None
        self._num_submitted += 1
        return _PipeResult(self, self._num_submitted - 1)

    def _results_of(self, call_index: int) -> list:
        """Results of the call_index-th submit; every rank answers its calls in order, so the
        calls before it are collected (and kept) first."""
        if call_index not in self._collected and not self.conns:
            raise WorkerError("the workers were shut down after an earlier failure")
        while self._num_collected <= call_index:
            self._collected[self._num_collected] = self._collect()
            self._num_collected += 1
        return self._collected.pop(call_index)

    def _collect(self) -> list:
        results: list = [None] * self.world_size
        pending = dict(enumerate(self.conns))
        while pending:
            sentinels = {self.processes[r].sentinel: r for r in pending}
            ready = wait(list(pending.values()) + list(sentinels))
            for item in ready:
                if item in sentinels:
                    rank = sentinels[item]
                    if rank in pending and not pending[rank].poll():
                        code = self.processes[rank].exitcode
                        self.shutdown()
                        raise WorkerError(f"worker rank {rank} died (exit code {code})")
                    continue
                rank = next(r for r, conn in pending.items() if conn is item)
                try:
                    status, value = item.recv()
                except (EOFError, OSError):
                    self.shutdown()
                    raise WorkerError(f"worker rank {rank} died (connection closed)") from None
                del pending[rank]
                if status == "error":
                    first_line = value.partition("\n")[0]
                    dead = self._first_dead_rank(grace_s=2.0)
                    self.shutdown()
                    if dead is not None:   # the root cause: rank `rank` lost its peer
                        raise WorkerError(f"worker rank {dead[0]} died (exit code {dead[1]}); "
                                          f"rank {rank} then failed: {first_line}")
                    raise WorkerError(f"worker rank {rank} failed: {first_line}")
                results[rank] = value
        return results

    def _first_dead_rank(self, grace_s: float) -> tuple[int, int | None] | None:
        """(rank, exit code) of a worker that has exited, waiting up to `grace_s` for one:
        a collective fails on the survivors about when the dead rank's sentinel fires."""
        ready = set(wait([process.sentinel for process in self.processes], timeout=grace_s))
        for rank, process in enumerate(self.processes):
            if process.sentinel in ready:
                # The sentinel closes a moment before the process can be reaped.
                process.join(timeout=1)
                return rank, process.exitcode
        return None

    def shutdown(self) -> None:
        for conn, process in zip(self.conns, self.processes):
            if process.is_alive():
                try:
                    conn.send((_SHUTDOWN, ()))
                except (OSError, BrokenPipeError):
                    pass
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        self.processes, self.conns = [], []
        self._rendezvous.close()

    def __del__(self):
        if getattr(self, "processes", None):
            self.shutdown()


class _PipeResult(PendingResult):
    def __init__(self, executor: MultiprocExecutor, call_index: int):
        self.executor, self.call_index = executor, call_index

    def results(self) -> list:
        return self.executor._results_of(self.call_index)
