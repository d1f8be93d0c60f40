"""What the completion and chat endpoints share: the serving context, turning a request's
prompts into engine requests, collecting or streaming their outputs, and SSE framing.

A stream's first output is awaited before the HTTP response starts, so a request the engine
refuses (e.g. a structured-output spec that does not compile) is still a plain 400.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from vbatch.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from vbatch.entrypoints.openai.engine_loop import (
    AsyncEngineClient,
    EngineRequest,
    EngineStoppedError,
)
from vbatch.entrypoints.openai.metrics import ServerMetrics
from vbatch.openai.protocol import OpenAIRequestError
from vbatch.openai.requests import SamplingRequest

DONE_EVENT = "data: [DONE]\n\n"
#: What may end a stream after its response started (reported as an event, then [DONE]).
STREAM_ERRORS = (OpenAIRequestError, EngineStoppedError)


@dataclass
class ServingContext:
    """What every endpoint needs: the engine client, the names served (the first is the one
    responses report), the engine's context length and the metrics."""

    client: AsyncEngineClient
    served_model_names: list[str]
    max_model_len: int
    metrics: ServerMetrics

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


@dataclass(frozen=True)
class PreparedPrompt:
    """One prompt, tokenized: its ids, its text (for echo) and its first token's text."""

    token_ids: list[int]
    text: str | None = None
    first_token_text: str = ""


def new_request_id(prefix: str) -> str:
    """A fresh OpenAI-style id: `chatcmpl-<hex>`, `cmpl-<hex>`."""
    return f"{prefix}-{uuid.uuid4().hex}"


def sse_event(data: dict) -> str:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def engine_requests(request: SamplingRequest, request_id: str, prompts: list[PreparedPrompt],
                    max_model_len: int) -> list[EngineRequest]:
    """One engine request per prompt (ids `<request_id>-<i>`; the chat's one prompt keeps
    `request_id`). With a `seed`, a prompt's draws depend only on (seed, prompt index), so
    the same request gives the same text again; without one they differ per request."""
    requests = []
    for index, prompt in enumerate(prompts):
        engine_id = request_id if len(prompts) == 1 else f"{request_id}-{index}"
        params = request.to_sampling_params(max_model_len, len(prompt.token_ids))
        requests.append(EngineRequest(
            engine_id, prompt.token_ids, params, prompt=prompt.text,
            row_key=f"prompt-{index}" if request.seed is not None else engine_id,
            stream=request.stream))
    return requests


def stream_error_event(error: Exception) -> str:
    """The SSE event that ends a stream which failed after its response started (the client
    has its 200 already): OpenAI's error JSON, 400 for the request's own fault, else 503."""
    if isinstance(error, OpenAIRequestError):
        return sse_event(error.to_dict())
    return sse_event(OpenAIRequestError(str(error), status_code=503,
                                        error_type="service_unavailable").to_dict())


def as_request_error(error: Exception) -> Exception:
    """A ValueError the engine raised for one request (a prompt or spec it cannot run) as a
    400; anything else unchanged."""
    if isinstance(error, ValueError) and not isinstance(error, OpenAIRequestError):
        return OpenAIRequestError(str(error))
    return error


class FinishedOutputs:
    """Each engine request's final output, and the tokens counted into the metrics."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.by_id: dict[str, RequestOutput] = {}

    def add(self, output: RequestOutput) -> None:
        if not output.finished:
            return
        self.by_id[output.request_id] = output
        self.metrics.prompt_tokens.inc(len(output.prompt_token_ids))
        self.metrics.generation_tokens.inc(sum(len(c.token_ids) for c in output.outputs))

    def in_order(self, requests: Sequence[EngineRequest]) -> list[RequestOutput]:
        return [self.by_id[request.request_id] for request in requests]


async def collect(context: ServingContext, requests: list[EngineRequest]
                  ) -> list[RequestOutput]:
    """The final outputs of `requests`, in their order (aborted if the caller is cancelled)."""
    finished = FinishedOutputs(context.metrics)
    generator = context.client.generate(requests)
    try:
        async for output in generator:
            finished.add(output)
    except Exception as error:  # noqa: BLE001 - the engine's refusal becomes a 400
        raise as_request_error(error) from None
    finally:
        await generator.aclose()
    return finished.in_order(requests)


async def start_stream(context: ServingContext, requests: list[EngineRequest]
                       ) -> tuple[RequestOutput, AsyncIterator[RequestOutput]]:
    """Submit `requests` and wait for their first output; (first, the rest)."""
    generator = context.client.generate(requests)
    try:
        first = await anext(generator)
    except BaseException as error:
        await generator.aclose()
        if isinstance(error, Exception):
            raise as_request_error(error) from None
        raise
    return first, generator


async def chained(first: RequestOutput, rest: AsyncIterator[RequestOutput]
                  ) -> AsyncIterator[RequestOutput]:
    """`first`, then the rest (closed with this generator: it aborts what is unfinished)."""
    try:
        yield first
        async for output in rest:
            yield output
    finally:
        await rest.aclose()


@dataclass
class ChoiceDelta:
    """What one streamed choice has not sent yet, from a cumulative snapshot."""

    text: str
    token_logprobs: list[TokenLogprob]
    finish_reason: str | None
    text_offset: int        # where `text` starts in the choice's generated text


@dataclass
class DeltaTracker:
    """Per choice, what was sent so far; turns cumulative snapshots into deltas."""

    sent_text: dict[int, int] = field(default_factory=dict)
    sent_tokens: dict[int, int] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)

    def delta(self, choice: int, completion: CompletionOutput) -> ChoiceDelta | None:
        """The new text/logprobs of `completion` (choice index `choice`), or None when there
        is nothing new; the finish reason is reported once."""
        if choice in self.finished:
            return None
        text_start = self.sent_text.get(choice, 0)
        token_start = self.sent_tokens.get(choice, 0)
        entries = (completion.token_logprobs or [])[token_start:]
        new_text = completion.text[text_start:]
        if not new_text and not entries and completion.finish_reason is None:
            return None
        self.sent_text[choice] = max(text_start, len(completion.text))
        self.sent_tokens[choice] = token_start + len(entries)
        if completion.finish_reason is not None:
            self.finished.add(choice)
        return ChoiceDelta(new_text, list(entries), completion.finish_reason, text_start)


class FirstTokenTimer:
    """Observes the time to first token of one request, once."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.started = time.monotonic()
        self.observed = False

    def check(self, output: RequestOutput) -> None:
        if not self.observed and any(c.token_ids for c in output.outputs):
            self.observed = True
            self.metrics.time_to_first_token.observe(time.monotonic() - self.started)
