"""POST /v1/chat/completions: the tokenizer's chat template, n, logprobs, streaming.

A stream sends, per choice, a first chunk with the assistant role, then each step's new text
(and its tokens' logprobs), the finish reason once, a usage chunk when
`stream_options.include_usage`, and `data: [DONE]`.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from vbatch.engine.llm_engine import LLMEngine
from vbatch.engine.outputs import RequestOutput
from vbatch.entrypoints.openai.serving import (
    DONE_EVENT,
    STREAM_ERRORS,
    DeltaTracker,
    FinishedOutputs,
    FirstTokenTimer,
    PreparedPrompt,
    ServingContext,
    chained,
    collect,
    engine_requests,
    new_request_id,
    sse_event,
    start_stream,
    stream_error_event,
)
from vbatch.openai.protocol import (
    ChatCompletionRequest,
    OpenAIRequestError,
    chat_chunk_choice,
    chat_completion_chunk,
    chat_completion_response,
    chat_logprobs,
    check_model,
    parse_chat_request,
    usage,
    usage_chunk,
)

CHUNK_OBJECT = "chat.completion.chunk"


def prepare_prompt(engine: LLMEngine, request: ChatCompletionRequest) -> PreparedPrompt:
    """The conversation through the chat template (on the engine loop's thread); a template
    that refuses it (e.g. roles out of order) is a 400."""
    try:
        return PreparedPrompt(engine.encode_prompt(messages=request.template_messages()))
    except Exception as error:  # noqa: BLE001 - jinja's TemplateError and what templates raise
        raise OpenAIRequestError(f"the chat template refused the messages: {error}",
                                 param="messages") from None


async def create_chat_completion(context: ServingContext, body: Any
                                 ) -> dict[str, Any] | AsyncIterator[str]:
    """The ChatCompletion body, or (stream) the SSE events; OpenAIRequestError if bad."""
    timer = FirstTokenTimer(context.metrics)
    request = parse_chat_request(body)
    check_model(request.model, context.served_model_names)
    prompt = await context.client.call(lambda engine: prepare_prompt(engine, request))
    request_id = new_request_id("chatcmpl")
    created = int(time.time())
    requests = engine_requests(request, request_id, [prompt], context.max_model_len)
    if request.stream:
        first, rest = await start_stream(context, requests)
        return _stream(context, request, request_id, created, requests, timer,
                       chained(first, rest))
    outputs = await collect(context, requests)
    return chat_completion_response(request, outputs, context.model_name, request_id, created)


async def _stream(context: ServingContext, request: ChatCompletionRequest, request_id: str,
                  created: int, requests, timer: FirstTokenTimer,
                  outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    model = context.model_name
    tracker = DeltaTracker()
    finished = FinishedOutputs(context.metrics)
    try:
        yield sse_event(chat_completion_chunk(request_id, created, model, [
            chat_chunk_choice(index, {"role": "assistant", "content": ""})
            for index in range(request.n)]))
        async for output in outputs:
            timer.check(output)
            finished.add(output)
            choices = []
            for completion in output.outputs:
                delta = tracker.delta(completion.index, completion)
                if delta is None:
                    continue
                logprobs = chat_logprobs(delta.token_logprobs, request.top_logprobs or 0) \
                    if request.logprobs else None
                choices.append(chat_chunk_choice(completion.index, {"content": delta.text},
                                                 delta.finish_reason, logprobs))
            if choices:
                yield sse_event(chat_completion_chunk(request_id, created, model, choices))
        if request.stream_options is not None and request.stream_options.include_usage:
            [done] = finished.in_order(requests)
            yield sse_event(usage_chunk(request_id, created, model, CHUNK_OBJECT, usage(
                len(done.prompt_token_ids), sum(len(c.token_ids) for c in done.outputs))))
    except STREAM_ERRORS as error:
        yield stream_error_event(error)
    finally:
        await outputs.aclose()
    yield DONE_EVENT
