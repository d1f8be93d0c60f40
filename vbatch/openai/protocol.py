"""vbatch's OpenAI protocol: what the server and the OpenAI batch files share (one import).

Requests (`vbatch.openai.requests`, parsed by `vbatch.openai.parsing`):
  - `ChatCompletionRequest`, `CompletionRequest`: pydantic v2 models of the bodies of
    `/v1/chat/completions` and `/v1/completions` (OpenAI's fields plus vLLM's extras:
    repetition_penalty, top_k, min_p, prompt_logprobs, ignore_eos, stop_token_ids,
    include_stop_str_in_output, skip_special_tokens, structured_outputs, guided_*). Strict
    types; an unknown field is refused by name.
  - `parse_chat_request(body)`, `parse_completion_request(body)`: a decoded JSON body ->
    the request, or `OpenAIRequestError` (400) naming the field at fault.
  - `check_model(requested, served)`: `OpenAIRequestError` 404 unless `requested` is None or
    one of `served`.
  - `request.to_sampling_params(max_model_len, num_prompt_tokens) -> SamplingParams` for one
    prompt (max_tokens defaults to what fits; too long -> 400). Structured outputs become
    `StructuredOutputsParams`; completions' `logprobs=k` -> `logprobs=k`, with `echo` also
    `prompt_logprobs=k`; chat `logprobs=true, top_logprobs=k` -> `logprobs=k`.
  - `ChatCompletionRequest.template_messages()` (for `engine.encode_prompt(messages=...)`),
    `CompletionRequest.prompts()` (one text or token-id list per engine request).

Responses (`vbatch.openai.responses`), plain dicts shaped as the `openai` package's types:
  - `chat_completion_response(request, outputs, model, request_id, created)` -> ChatCompletion
  - `completion_response(request, outputs, model, request_id, created, token_text=None)`
    -> Completion (one RequestOutput per prompt; choice index = prompt * n + sample)
  - streaming: `chat_completion_chunk` + `chat_chunk_choice`, `completion_chunk` +
    `completion_chunk_choice`, `usage_chunk`; pieces: `usage`, `chat_logprobs`,
    `completion_logprobs`, `vllm_prompt_logprobs`.

Errors (`vbatch.openai.errors`): `OpenAIRequestError(ValueError)` with `.status_code`,
`.param`, `.error_type`, `.code` and `.to_dict()` -> `{"error": {message, type, param, code}}`.
"""
from __future__ import annotations

from vbatch.openai.errors import OpenAIRequestError, not_found, unauthorized
from vbatch.openai.parsing import (
    check_model,
    parse_chat_request,
    parse_completion_request,
    parse_request,
)
from vbatch.openai.requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponseFormat,
    StreamOptions,
    StructuredOutputsRequest,
)
from vbatch.openai.responses import (
    chat_chunk_choice,
    chat_completion_chunk,
    chat_completion_response,
    chat_logprobs,
    completion_chunk,
    completion_chunk_choice,
    completion_logprobs,
    completion_response,
    usage,
    usage_chunk,
    vllm_prompt_logprobs,
)

__all__ = [
    "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "OpenAIRequestError",
    "ResponseFormat", "StreamOptions", "StructuredOutputsRequest", "chat_chunk_choice",
    "chat_completion_chunk", "chat_completion_response", "chat_logprobs", "check_model",
    "completion_chunk", "completion_chunk_choice", "completion_logprobs",
    "completion_response", "not_found", "parse_chat_request", "parse_completion_request",
    "parse_request", "unauthorized", "usage", "usage_chunk", "vllm_prompt_logprobs",
]
