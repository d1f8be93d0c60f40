"""POST /v1/completions: text or token-id prompts, n, logprobs, echo, streaming.

Each prompt is one engine request; all of a body's prompts are submitted together. Choices
are numbered `prompt_index * n + sample_index`. A stream sends, per choice, the new text of
each step (the echoed prompt with the first delta) and ends with `data: [DONE]`.
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
    CompletionRequest,
    OpenAIRequestError,
    check_model,
    completion_chunk,
    completion_chunk_choice,
    completion_logprobs,
    completion_response,
    parse_completion_request,
    usage,
    usage_chunk,
)


def prepare_prompts(engine: LLMEngine, request: CompletionRequest) -> list[PreparedPrompt]:
    """Tokenize text prompts (special tokens added, as `vbatch run` does) and check token-id
    prompts against the vocabulary; on the engine loop's thread (it owns the tokenizer)."""
    tokenizer = engine.tokenizer
    vocab_size = engine.hf_config.vocab_size
    prepared = []
    for index, prompt in enumerate(request.prompts()):
        if isinstance(prompt, str):
            token_ids = engine.encode_prompt(prompt=prompt)
            text = prompt
        else:
            bad = next((token for token in prompt if token >= vocab_size), None)
            if bad is not None:
                raise OpenAIRequestError(
                    f"prompt {index} has token id {bad}, outside the vocabulary (0.."
                    f"{vocab_size - 1})", param="prompt")
            token_ids = prompt
            text = tokenizer.decode(prompt) if request.echo else None
        first = tokenizer.decode(token_ids[:1]) if request.echo and token_ids else ""
        prepared.append(PreparedPrompt(token_ids, text, first))
    return prepared


async def create_completion(context: ServingContext, body: Any
                            ) -> dict[str, Any] | AsyncIterator[str]:
    """The Completion body, or (stream) the SSE events; OpenAIRequestError for a bad body."""
    timer = FirstTokenTimer(context.metrics)
    request = parse_completion_request(body)
    check_model(request.model, context.served_model_names)
    prompts = await context.client.call(lambda engine: prepare_prompts(engine, request))
    request_id = new_request_id("cmpl")
    created = int(time.time())
    requests = engine_requests(request, request_id, prompts, context.max_model_len)
    first_texts = {p.token_ids[0]: p.first_token_text for p in prompts if p.token_ids}
    if request.stream:
        first, rest = await start_stream(context, requests)
        return _stream(context, request, request_id, created, requests, prompts, timer,
                       chained(first, rest))
    outputs = await collect(context, requests)
    return completion_response(request, outputs, context.model_name, request_id, created,
                               token_text=first_texts.get)


async def _stream(context: ServingContext, request: CompletionRequest, request_id: str,
                  created: int, requests, prompts: list[PreparedPrompt],
                  timer: FirstTokenTimer, outputs: AsyncIterator[RequestOutput]
                  ) -> AsyncIterator[str]:
    prompt_index = {r.request_id: i for i, r in enumerate(requests)}
    tracker = DeltaTracker()
    finished = FinishedOutputs(context.metrics)
    started: set[int] = set()
    model = context.model_name
    num_top = request.logprobs or 0
    echo_only = request.max_tokens == 0     # the one token the engine generated is not sent
    try:
        async for output in outputs:
            timer.check(output)
            finished.add(output)
            index = prompt_index[output.request_id]
            choices = []
            for completion in output.outputs:
                choice = index * request.n + completion.index
                delta = tracker.delta(choice, completion)
                if delta is None:
                    continue
                text = "" if echo_only else delta.text
                entries = [] if echo_only else delta.token_logprobs
                prompt_text = (prompts[index].text or "") if request.echo else ""
                logprobs = None
                if request.logprobs is not None:
                    logprobs = completion_logprobs(
                        entries, num_top, text_offset=len(prompt_text) + delta.text_offset)
                if request.echo and choice not in started:
                    text, logprobs = _with_echo(prompts[index], output, text, logprobs, num_top)
                started.add(choice)
                finish_reason = "length" if echo_only and delta.finish_reason \
                    else delta.finish_reason
                choices.append(completion_chunk_choice(choice, text, finish_reason, logprobs))
            if choices:
                yield sse_event(completion_chunk(request_id, created, model, choices))
        if request.stream_options is not None and request.stream_options.include_usage:
            done = finished.in_order(requests)
            generated = 0 if echo_only else sum(len(c.token_ids) for o in done for c in o.outputs)
            yield sse_event(usage_chunk(request_id, created, model, "text_completion", usage(
                sum(len(o.prompt_token_ids) for o in done), generated)))
    except STREAM_ERRORS as error:
        yield stream_error_event(error)
    finally:
        await outputs.aclose()
    yield DONE_EVENT


def _with_echo(prompt: PreparedPrompt, output: RequestOutput, text: str,
               logprobs: dict | None, num_top: int) -> tuple[str, dict | None]:
    """A choice's first delta, with the echoed prompt (and its logprobs) before it."""
    prompt_text = prompt.text or ""
    if logprobs is not None:
        echoed = completion_logprobs(output.prompt_token_logprobs or [], num_top,
                                     first_token_text=prompt.first_token_text)
        logprobs = {key: echoed[key] + logprobs[key] for key in echoed}
    return prompt_text + text, logprobs
