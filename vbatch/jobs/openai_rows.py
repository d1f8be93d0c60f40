"""OpenAI batch requests (rows of io/openai_batch.py) -> engine requests, and each finished
request -> its response body.

A line is translated on its own, with the OpenAI protocol module (`vbatch.openai.protocol`),
into its token ids and its own complete `SamplingParams` (the job's sampling flags do not
apply: a body says everything, with OpenAI's defaults for what it leaves out, `max_tokens`
included: as many as fit). Every problem is that line's error row, never the job's:

- `invalid_json`: the line is not a JSON object (or not UTF-8), its custom_id not a string;
- `invalid_request`: a method other than POST, a url other than /v1/chat/completions and
  /v1/completions, a body the protocol refuses (an unknown or unsupported field, a wrong type,
  `stream: true`, a prompt with no room to generate), a completions `prompt` holding several
  prompts (refused: give each prompt its own line), token ids outside the vocabulary;
- `model_not_found`: the body's `model` is not the job's (`--model` as given, or the path it
  resolved to); omit it to use the job's model;
- `chat_template`: the chat template raised on the messages.

Chat messages are rendered by the model's chat template with the generation prompt; a text
prompt is tokenized with the tokenizer's special tokens (as `vbatch run` does for a prompt
column), token ids are used as they are. `--on-long-prompt` does not apply (OpenAI refuses a
too-long prompt). The response body is the protocol module's `ChatCompletion` / `Completion`
dict, one choice per sample (n > 1: one body with n choices), with usage.
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa

from vbatch.engine.outputs import RequestOutput
from vbatch.engine.sampling_params import SamplingParams
from vbatch.io.openai_batch import BODY, LINE_ERROR, METHOD, URL
from vbatch.io.schema import (
    FINISH_REASON,
    GENERATED_TEXT,
    NUM_GENERATED_TOKENS,
    NUM_PROMPT_TOKENS,
    RESPONSE,
)
from vbatch.jobs.row_errors import (
    CHAT_TEMPLATE,
    INVALID_JSON,
    INVALID_REQUEST,
    MODEL_NOT_FOUND,
    TOKENIZE,
    RowError,
)
from vbatch.jobs.row_token_ids import token_ids_cell, vocabulary_size
from vbatch.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequestError,
    chat_completion_response,
    check_model,
    completion_response,
    parse_chat_request,
    parse_completion_request,
)

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
_PARSERS = {CHAT_URL: parse_chat_request, COMPLETIONS_URL: parse_completion_request}


@dataclass(frozen=True)
class OpenAIRequest:
    """One line's request, ready for the engine: the parsed body, the prompt's token ids, its
    `SamplingParams` and the prompt text (completions' `echo` repeats it; None for chat)."""

    request: ChatCompletionRequest | CompletionRequest
    token_ids: list[int]
    params: SamplingParams
    prompt: str | None


def _request_error(error: OpenAIRequestError) -> RowError:
    code = MODEL_NOT_FOUND if error.status_code == 404 else INVALID_REQUEST
    return RowError(code, error.message)


class OpenAIRows:
    """Translates OpenAI batch rows for one engine (`tokenizer`, `max_model_len`,
    `encode_prompt`, `hf_config`). `served_models`: the names a body's `model` may use; the
    first is the `model` of every response body."""

    def __init__(self, engine, served_models: list[str]):
        if not served_models:
            raise ValueError("OpenAIRows needs at least one served model name")
        self.engine = engine
        self.served_models = list(dict.fromkeys(served_models))
        self.model = self.served_models[0]
        self.vocab_size = vocabulary_size(engine)

    def for_batch(self, batch: pa.RecordBatch) -> list[OpenAIRequest | RowError]:
        """One entry per row of `batch` (columns of `OPENAI_BATCH_SCHEMA`): its request, or the
        RowError that makes it this line's error."""
        columns = {name: batch.column(name).to_pylist()
                   for name in (LINE_ERROR, METHOD, URL, BODY)}
        return [self._row(*(columns[name][row] for name in (LINE_ERROR, METHOD, URL, BODY)))
                for row in range(batch.num_rows)]

    def _row(self, line_error: str | None, method: str | None, url: str | None,
             body: str | None) -> OpenAIRequest | RowError:
        if line_error is not None:
            return RowError(INVALID_JSON, line_error)
        if method != "POST":
            return RowError(INVALID_REQUEST, f"method must be POST, got {method!r}")
        parse = _PARSERS.get(url)
        if parse is None:
            return RowError(INVALID_REQUEST, f"url {url!r} is not supported; use "
                                             f"{CHAT_URL} or {COMPLETIONS_URL}")
        if body is None:
            return RowError(INVALID_REQUEST, "the line has no body")
        try:
            request = parse(json.loads(body))
            if request.stream:
                raise OpenAIRequestError("stream is not supported in batch files; remove it",
                                         param="stream")
            check_model(request.model, self.served_models)
        except OpenAIRequestError as error:
            return _request_error(error)
        prompt = self._prompt(request)
        if isinstance(prompt, RowError):
            return prompt
        token_ids, text = prompt
        try:
            params = request.to_sampling_params(self.engine.max_model_len, len(token_ids))
        except OpenAIRequestError as error:
            return _request_error(error)
        return OpenAIRequest(request, token_ids, params, text)

    def _prompt(self, request) -> tuple[list[int], str | None] | RowError:
        """The request's prompt token ids and text, or its RowError."""
        if isinstance(request, ChatCompletionRequest):
            try:
                return self.engine.encode_prompt(messages=request.template_messages()), None
            except Exception as error:  # noqa: BLE001 - any template failure is this line's
                return RowError(CHAT_TEMPLATE, f"{type(error).__name__}: {error}")
        prompts = request.prompts()
        if len(prompts) != 1:
            return RowError(INVALID_REQUEST, f"prompt holds {len(prompts)} prompts; a batch "
                                             "file line takes one: give each its own line")
        prompt = prompts[0]
        if isinstance(prompt, str):
            try:
                return self.engine.encode_prompt(prompt=prompt), prompt
            except Exception as error:  # noqa: BLE001 - this line's error
                return RowError(TOKENIZE, f"{type(error).__name__}: {error}")
        token_ids = token_ids_cell(prompt, self.vocab_size)
        if isinstance(token_ids, RowError):
            return RowError(INVALID_REQUEST, token_ids.message.replace("prompt_token_ids",
                                                                       "prompt"))
        text = self.engine.tokenizer.decode(token_ids) if request.echo else None
        return token_ids, text

    def result(self, request: OpenAIRequest, output: RequestOutput) -> dict:
        """The output row of a finished request (`build_output_batch`'s result dict): the first
        sample's text and finish reason, prompt tokens, generated tokens of all samples, and
        the response body as JSON text (`response`)."""
        samples = sorted(output.outputs, key=lambda completion: completion.index)
        output = dataclasses.replace(output, outputs=samples)
        created = int(time.time())
        if isinstance(request.request, ChatCompletionRequest):
            body = chat_completion_response(request.request, [output], self.model,
                                            f"chatcmpl-{uuid.uuid4().hex}", created)
        else:
            tokenizer = self.engine.tokenizer
            body = completion_response(request.request, [output], self.model,
                                       f"cmpl-{uuid.uuid4().hex}", created,
                                       token_text=lambda token: tokenizer.decode([token]))
        return {GENERATED_TEXT: samples[0].text, FINISH_REASON: samples[0].finish_reason,
                NUM_PROMPT_TOKENS: len(output.prompt_token_ids),
                NUM_GENERATED_TOKENS: sum(len(sample.token_ids) for sample in samples),
                RESPONSE: json.dumps(body, ensure_ascii=False)}
