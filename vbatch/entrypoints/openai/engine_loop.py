"""One engine, many concurrent HTTP requests: a thread that steps the engine continuously.

`EngineLoop` owns an `LLMEngine`. Only its thread touches the engine: submissions, aborts
and calls (`call(fn)`, e.g. tokenizing) wait in a thread-safe queue and run between steps, so
every request arriving while others run joins the next step (continuous batching; with
pipeline parallelism, the engine's virtual engines fill from concurrent requests). The thread
blocks on the queue while the engine is idle and steps while any request is unfinished.

`AsyncEngineClient` is the asyncio side: `generate` submits prompts and yields their outputs
as they arrive (handed to the event loop with `call_soon_threadsafe`), and aborts whatever is
unfinished when the consumer stops early (a client that disconnected).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from vbatch.engine.llm_engine import LLMEngine
from vbatch.engine.outputs import RequestOutput
from vbatch.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")
#: Receives a request's outputs (and the exception that ended it), on the loop's thread.
Sink = Callable[[RequestOutput | BaseException], None]


class EngineStoppedError(RuntimeError):
    """The engine loop is not running (stopped, or its engine failed)."""


@dataclass(frozen=True)
class EngineRequest:
    """One prompt for the engine: `row_key` and `stream` as `LLMEngine.add_request` takes."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    row_key: str | None = None
    stream: bool = False


class EngineLoop:
    """Steps `engine` in a background thread (see module docstring).

    `on_change(engine)` runs on the thread after every step and every batch of commands (for
    metrics). `start()` starts the thread, `stop()` ends it (the engine is left to its owner).
    A step that raises fails every unfinished request with that error and stops the loop
    (`error` keeps it).
    """

    def __init__(self, engine: LLMEngine, on_change: Callable[[LLMEngine], None] | None = None):
        self.engine = engine
        self.on_change = on_change
        self.error: BaseException | None = None
        # (run on the thread, report that the loop stopped) pairs; None asks the loop to end
        self._commands: queue.SimpleQueue[tuple[Callable[[], None], Callable[[Exception], None]]
                                          | None] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._thread = threading.Thread(target=self._run, name="vbatch-engine-loop",
                                        daemon=True)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread after its current step (unfinished requests are dropped)."""
        if self._thread.is_alive():
            self._commands.put(None)
            self._thread.join(timeout)

    # ---- thread-safe API ---------------------------------------------------------------
    def call(self, fn: Callable[[LLMEngine], T]) -> concurrent.futures.Future[T]:
        """Run `fn(engine)` on the loop's thread between steps; its result or exception comes
        back in the future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def command() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as error:  # noqa: BLE001 - handed to the caller
                    future.set_exception(error)
        self._submit(command, lambda error: future.set_exception(error))
        return future

    def add_request(self, request: EngineRequest, sink: Sink) -> None:
        """Queue `request`; `sink` gets each of its outputs (the last one finished) or the
        exception that refused it (e.g. a ValueError from `add_request`)."""
        def command() -> None:
            try:
                self.engine.add_request(request.request_id, request.prompt_token_ids,
                                        request.sampling_params, prompt=request.prompt,
                                        row_key=request.row_key, stream=request.stream)
            except Exception as error:  # noqa: BLE001 - the request's own failure
                sink(error)
                return
            self._sinks[request.request_id] = sink
        self._submit(command, sink)

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is (a no-op once it finished)."""
        def command() -> None:
            self._sinks.pop(request_id, None)
            self.engine.abort_request(request_id)
        self._submit(command, lambda error: None)

    def _submit(self, command: Callable[[], None], on_stopped: Callable[[Exception], None]
                ) -> None:
        if not self.is_running:
            on_stopped(EngineStoppedError(f"the engine is not running: {self.error}"
                                          if self.error else "the engine is not running"))
            return
        self._commands.put((command, on_stopped))

    # ---- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._run_commands(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
                self._changed()
        except Exception as error:  # noqa: BLE001 - reported to every waiting request
            logger.exception("the engine failed")
            self.error = error
        stopped = EngineStoppedError(f"the engine failed: {self.error}" if self.error
                                     else "the engine loop stopped")
        for sink in self._sinks.values():
            sink(stopped)
        self._sinks.clear()
        self._fail_queued(stopped)

    def _run_commands(self, *, block: bool) -> bool:
        """Run queued commands (waiting for one if `block`); False when asked to stop."""
        ran = False
        while True:
            try:
                command = self._commands.get(block=block and not ran)
            except queue.Empty:
                break
            if command is None:
                return False
            command[0]()
            ran = True
        if ran:
            self._changed()
        return True

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand each output to its sink; outputs bound for one event loop go in one wake-up of
        that loop (a step of 64 streams: one call instead of 64, so the event loop's thread
        interrupts the engine's compute threads once per step)."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            sink = self._sinks.pop(output.request_id) if output.finished \
                else self._sinks.get(output.request_id)
            if isinstance(sink, QueueSink):
                batches.setdefault(sink.loop, []).append((sink.queue, output))
            elif sink is not None:
                sink(output)
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:    # the event loop closed: nobody is waiting any more
                pass

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.engine)

    def _fail_queued(self, stopped: EngineStoppedError) -> None:
        """Commands still queued when the loop ends: each reports that it stopped."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command is not None:
                command[1](stopped)


class QueueSink:
    """A sink that puts each item into an asyncio queue on its event loop (thread-safe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, items: asyncio.Queue):
        self.loop, self.queue = loop, items

    def __call__(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:    # the event loop closed: nobody is waiting any more
            pass


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for target, item in items:
        target.put_nowait(item)


class AsyncEngineClient:
    """The event loop's handle on an `EngineLoop`."""

    def __init__(self, engine_loop: EngineLoop):
        self.engine_loop = engine_loop

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """`fn(engine)` run on the loop's thread, awaited."""
        return await asyncio.wrap_future(self.engine_loop.call(fn))

    async def generate(self, requests: list[EngineRequest]) -> AsyncIterator[RequestOutput]:
        """Submit `requests` together and yield their outputs as they come (streamed ones
        also unfinished); raises the first request's failure. Whatever is unfinished when the
        consumer stops (or is cancelled) is aborted."""
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        sink = QueueSink(asyncio.get_running_loop(), outputs)
        unfinished = {request.request_id for request in requests}
        try:
            for request in requests:
                self.engine_loop.add_request(request, sink)
            while unfinished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    unfinished.discard(item.request_id)
                yield item
        finally:
            for request_id in unfinished:
                self.engine_loop.abort(request_id)
