"""OpenAI response bodies built from the engine's `RequestOutput`s.

`chat_completion_response` is shaped as openai's `ChatCompletion`, `completion_response` as
`Completion`; the `*_chunk` builders are the streamed `ChatCompletionChunk` / completion chunks
(the same object as `Completion`, one delta per choice), and `usage_chunk` the last chunk of a
stream that asked for `stream_options.include_usage` (no choices, only usage).

Completions' `logprobs` are the legacy shape lm-eval's `local-completions` reads:
`{tokens, token_logprobs, top_logprobs, text_offset}` per choice, one entry per token; with
`echo` the prompt's entries come first (the first prompt token has none: null), then the
completion's. `top_logprobs[i]` maps token text to logprob for the `logprobs` most likely
tokens and the token itself (so `token_logprobs[i] == max(top_logprobs[i].values())` exactly
when the token was the most likely). Logprobs are clamped at -9999.0 (vLLM's floor: JSON has
no -inf).

vLLM's `prompt_logprobs` extra (when the request asks for it): top-level in a chat
completion, per choice in a completion; per prompt token None (the first) or
`{token_id: {logprob, rank, decoded_token}}`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vbatch.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from vbatch.openai.requests import ChatCompletionRequest, CompletionRequest

LOGPROB_FLOOR = -9999.0


def _logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's `usage` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def vllm_prompt_logprobs(output: RequestOutput) -> list[dict[int, dict] | None] | None:
    """vLLM's `prompt_logprobs` of one prompt (see module docstring), or None."""
    if output.prompt_token_logprobs is None:
        return None
    return [None if entry is None else
            {token_id: {"logprob": _logprob(lp.logprob), "rank": lp.rank,
                        "decoded_token": lp.decoded_token}
             for token_id, lp in entry.as_vllm_dict().items()}
            for entry in output.prompt_token_logprobs]


def _request_usage(outputs: Sequence[RequestOutput], *, count_completion: bool = True
                   ) -> dict[str, int]:
    prompt = sum(len(out.prompt_token_ids) for out in outputs)
    completion = sum(len(c.token_ids) for out in outputs for c in out.outputs) \
        if count_completion else 0
    return usage(prompt, completion)


# ---- chat ---------------------------------------------------------------------------------

def chat_logprobs(entries: Sequence[TokenLogprob], num_top: int) -> dict[str, Any]:
    """`choice.logprobs` of a chat completion: `{"content": [{token, logprob, bytes,
    top_logprobs: [{token, logprob, bytes}] * num_top}]}`."""
    return {"content": [
        {"token": entry.token, "logprob": _logprob(entry.logprob),
         "bytes": list(entry.token.encode("utf-8")),
         "top_logprobs": [{"token": top.token, "logprob": _logprob(top.logprob),
                           "bytes": list(top.token.encode("utf-8"))}
                          for top in entry.top_logprobs[:num_top]]}
        for entry in entries]}


def _chat_choice_logprobs(request: ChatCompletionRequest, completion: CompletionOutput,
                          entries: Sequence[TokenLogprob] | None = None) -> dict | None:
    if not request.logprobs:
        return None
    if entries is None:
        entries = completion.token_logprobs or []
    return chat_logprobs(entries, request.top_logprobs or 0)


def chat_completion_response(request: ChatCompletionRequest, outputs: Sequence[RequestOutput],
                             model: str, request_id: str, created: int) -> dict[str, Any]:
    """A `ChatCompletion` body: one choice per sample of `outputs` (normally one RequestOutput
    of `request.n` samples), indexed in order, with usage."""
    choices = []
    for output in outputs:
        for completion in output.outputs:
            choices.append({
                "index": len(choices),
                "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason,
                "logprobs": _chat_choice_logprobs(request, completion)})
    body = {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": _request_usage(outputs)}
    if request.prompt_logprobs is not None and outputs:
        body["prompt_logprobs"] = vllm_prompt_logprobs(outputs[0])
    return body


def chat_completion_chunk(request_id: str, created: int, model: str,
                          choices: list[dict[str, Any]]) -> dict[str, Any]:
    """A `ChatCompletionChunk` with the given choices (see `chat_chunk_choice`)."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": choices}


def chat_chunk_choice(index: int, delta: dict[str, Any], finish_reason: str | None = None,
                      logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed choice: `delta` is `{"role": "assistant", "content": ""}` first, then
    `{"content": new_text}`."""
    return {"index": index, "delta": delta, "finish_reason": finish_reason,
            "logprobs": logprobs}


def usage_chunk(request_id: str, created: int, model: str, object_name: str,
                usage_body: dict[str, int]) -> dict[str, Any]:
    """The final chunk of `stream_options.include_usage`: no choices, the whole usage.
    `object_name` is "chat.completion.chunk" or "text_completion"."""
    return {"id": request_id, "object": object_name, "created": created, "model": model,
            "choices": [], "usage": usage_body}


# ---- completions --------------------------------------------------------------------------

def completion_logprobs(entries: Sequence[TokenLogprob | None], num_top: int,
                        first_token_text: str = "", text_offset: int = 0) -> dict[str, Any]:
    """Legacy `logprobs` for a run of tokens (see module docstring). A None entry (the first
    prompt token) has no logprob: its text is `first_token_text`. Offsets count characters
    from `text_offset` (where the run starts in the choice's text)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for entry in entries:
        offsets.append(text_offset)
        if entry is None:
            tokens.append(first_token_text)
            token_logprobs.append(None)
            top_logprobs.append(None)
            text_offset += len(first_token_text)
            continue
        tokens.append(entry.token)
        token_logprobs.append(_logprob(entry.logprob))
        top: dict[str, float] = {}
        for alternative in entry.top_logprobs[:num_top]:    # texts may repeat: keep the likelier
            top.setdefault(alternative.token, _logprob(alternative.logprob))
        top.setdefault(entry.token, _logprob(entry.logprob))
        top_logprobs.append(top)
        text_offset += len(entry.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def _merge_logprobs(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    return {key: first[key] + second[key] for key in first}


def completion_response(request: CompletionRequest, outputs: Sequence[RequestOutput],
                        model: str, request_id: str, created: int, *,
                        token_text: Callable[[int], str] | None = None) -> dict[str, Any]:
    """A `Completion` body: `outputs` holds one RequestOutput per prompt, in prompt order;
    choice `prompt_index * n + sample_index`. With `echo` the text starts with the prompt
    (`RequestOutput.prompt`: the caller sets it, decoded, for token-id prompts) and the
    logprobs with the prompt's entries; `token_text(id)` gives the first prompt token's text
    (empty without it). `max_tokens=0` (echo only) returns no generated token."""
    choices = []
    echo_only = request.max_tokens == 0
    for output in outputs:
        prompt_text = output.prompt or ""
        for completion in output.outputs:
            text = "" if echo_only else completion.text
            logprobs = None
            if request.logprobs is not None:
                logprobs = _completion_choice_logprobs(request, output, completion, prompt_text,
                                                       token_text, echo_only)
            choice = {"index": len(choices),
                      "text": (prompt_text + text) if request.echo else text,
                      "finish_reason": "length" if echo_only else completion.finish_reason,
                      "logprobs": logprobs}
            if request.prompt_logprobs is not None:
                choice["prompt_logprobs"] = vllm_prompt_logprobs(output)
            choices.append(choice)
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": _request_usage(outputs, count_completion=not echo_only)}


def _completion_choice_logprobs(request: CompletionRequest, output: RequestOutput,
                                completion: CompletionOutput, prompt_text: str,
                                token_text: Callable[[int], str] | None,
                                echo_only: bool) -> dict[str, Any]:
    num_top = request.logprobs or 0
    generated = [] if echo_only else (completion.token_logprobs or [])
    if not request.echo:
        return completion_logprobs(generated, num_top)
    first = token_text(output.prompt_token_ids[0]) if token_text is not None else ""
    prompt_part = completion_logprobs(output.prompt_token_logprobs or [], num_top,
                                      first_token_text=first)
    return _merge_logprobs(prompt_part, completion_logprobs(generated, num_top,
                                                            text_offset=len(prompt_text)))


def completion_chunk(request_id: str, created: int, model: str,
                     choices: list[dict[str, Any]]) -> dict[str, Any]:
    """A streamed completion chunk (a `Completion` object with deltas as choices)."""
    return {"id": request_id, "object": "text_completion", "created": created,
            "model": model, "choices": choices}


def completion_chunk_choice(index: int, text: str, finish_reason: str | None = None,
                            logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed completion choice: the new text (and its tokens' logprobs)."""
    return {"index": index, "text": text, "finish_reason": finish_reason,
            "logprobs": logprobs}
