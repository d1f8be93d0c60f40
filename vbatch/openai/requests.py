"""The bodies of `/v1/completions` and `/v1/chat/completions`, and how they become sampling
parameters.

Models are pydantic v2, strict (no "5" for 5, no 1.0 for an integer, no 1 for true) and closed
(`extra="forbid"`: an unknown field is refused by name rather than silently ignored);
`vbatch.openai.parsing` validates bodies with them. Which settings map to which
`SamplingParams` fields is in `to_sampling_params`.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from vbatch.engine.sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams
from vbatch.engine.structured_output import StructuredOutputsParams
from vbatch.openai.errors import OpenAIRequestError
from vbatch.options import UINT64_MAX

Logprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
TokenId = Annotated[int, Field(ge=0)]


class StrictModel(BaseModel):
    """Strict types, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


class JsonSchemaFormat(StrictModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(StrictModel):
    """vLLM's `structured_outputs` extra: exactly one kind (checked by StructuredOutputsParams)."""

    choice: list[str] | None = None
    regex: str | None = None
    json_: dict[str, Any] | str | bool | None = Field(None, alias="json")
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class SamplingRequest(StrictModel):
    """The fields both endpoints share (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, le=UINT64_MAX)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    prompt_logprobs: Logprobs | None = None
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsRequest | None = None
    guided_choice: list[str] | None = None
    guided_regex: str | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_grammar: str | None = None

    def check(self) -> None:
        """Cross-field rules pydantic's per-field types cannot say; raises OpenAIRequestError."""
        if self.stream_options is not None and not self.stream:
            raise OpenAIRequestError("stream_options is only allowed when stream is true",
                                     param="stream_options")

    # ---- to SamplingParams ------------------------------------------------------------
    def requested_max_tokens(self) -> int | None:
        """The output limit the client asked for (None: as many as fit)."""
        return self.max_tokens

    def logprob_settings(self) -> dict[str, int | None]:
        """SamplingParams' `logprobs` / `prompt_logprobs` for this request."""
        return {"logprobs": None, "prompt_logprobs": self.prompt_logprobs}

    def to_sampling_params(self, max_model_len: int, num_prompt_tokens: int) -> SamplingParams:
        """The engine's parameters for one prompt of `num_prompt_tokens` tokens.

        `max_tokens` defaults to whatever fits in `max_model_len`; a request that cannot fit
        (an empty or too long prompt, or a `max_tokens` beyond the room left) raises
        OpenAIRequestError (400), as vLLM does. Omitted settings take OpenAI's defaults
        (temperature 1, top_p 1, no penalties)."""
        room = max_model_len - num_prompt_tokens
        if num_prompt_tokens == 0:
            raise OpenAIRequestError("the prompt is empty", param=self.prompt_field)
        if room < 1:
            raise OpenAIRequestError(
                f"This model's maximum context length is {max_model_len} tokens, and the "
                f"prompt has {num_prompt_tokens} tokens: no room is left to generate. Shorten "
                "the prompt.", param=self.prompt_field)
        wanted = self.requested_max_tokens()
        if wanted is not None and wanted > room:
            raise OpenAIRequestError(
                f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {num_prompt_tokens + wanted} tokens ({num_prompt_tokens} in the "
                f"prompt, {wanted} for the completion). Lower max_tokens to at most {room}.",
                param="max_tokens")
        if wanted == 0 and not self.allows_zero_tokens():
            raise OpenAIRequestError("max_tokens must be >= 1, got 0", param="max_tokens")
        values = {
            "n": self.n, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "min_p": self.min_p, "seed": self.seed, "stop": self.stop,
            # max_tokens=0 (echo only): the engine generates one token that is not returned
            "max_tokens": room if wanted is None else max(wanted, 1),
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "stop_token_ids": self.stop_token_ids, "ignore_eos": self.ignore_eos,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
            "structured_outputs": self.structured_outputs_params(),
            **self.logprob_settings(),
        }
        try:
            return SamplingParams(**{k: v for k, v in values.items() if v is not None})
        except ValueError as error:
            field = str(error).split(" ", 1)[0]
            raise OpenAIRequestError(str(error), param=field if field in values else None
                                     ) from None

    #: The body field that holds the prompt (named by errors about it).
    prompt_field: ClassVar[str] = "prompt"

    def allows_zero_tokens(self) -> bool:
        """Whether max_tokens=0 is meaningful (only completions' echo)."""
        return False

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The one structured-output constraint of the request (response_format, vLLM's
        `structured_outputs` or a `guided_*` field), or None; two at once are refused."""
        specs: list[tuple[str, dict[str, Any]]] = []
        if self.structured_outputs is not None:
            specs.append(("structured_outputs", self.structured_outputs.model_dump(
                by_alias=True, exclude_none=True)))
        for kind in ("choice", "regex", "json", "grammar"):
            value = getattr(self, f"guided_{kind}")
            if value is not None:
                specs.append((f"guided_{kind}", {kind: value}))
        response_format = self.response_format
        if response_format is not None and response_format.type == "json_object":
            specs.append(("response_format", {"json_object": True}))
        elif response_format is not None and response_format.type == "json_schema":
            schema = None if response_format.json_schema is None \
                else response_format.json_schema.schema_
            if schema is None:
                raise OpenAIRequestError(
                    "response_format of type json_schema needs json_schema.schema",
                    param="response_format.json_schema.schema")
            specs.append(("response_format", {"json": schema}))
        if not specs:
            return None
        if len(specs) > 1:
            raise OpenAIRequestError(
                "give one structured-output constraint, got "
                + ", ".join(name for name, _ in specs), param=specs[1][0])
        name, spec = specs[0]
        if isinstance(spec.get("json"), bool):   # a boolean schema: JSON text keeps it one
            spec["json"] = json.dumps(spec["json"])
        try:
            return StructuredOutputsParams(**spec)
        except ValueError as error:
            raise OpenAIRequestError(str(error), param=name) from None


class TextContentPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        """{"role", "content"} as chat templates take it (developer is a system message)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(SamplingRequest):
    """The body of POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Logprobs | None = None

    prompt_field: ClassVar[str] = "messages"

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIRequestError("top_logprobs needs logprobs set to true",
                                     param="top_logprobs")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def logprob_settings(self) -> dict[str, int | None]:
        return {"logprobs": (self.top_logprobs or 0) if self.logprobs else None,
                "prompt_logprobs": self.prompt_logprobs}

    def template_messages(self) -> list[dict[str, str]]:
        """The conversation as `engine.encode_prompt(messages=...)` takes it."""
        return [message.for_template() for message in self.messages]


PromptInput = str | Annotated[list[str], Field(min_length=1)] \
    | Annotated[list[TokenId], Field(min_length=1)] \
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]


class CompletionRequest(SamplingRequest):
    """The body of POST /v1/completions."""

    prompt: PromptInput
    logprobs: Logprobs | None = None
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per engine request: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return list(prompt)

    def allows_zero_tokens(self) -> bool:
        return self.echo

    def logprob_settings(self) -> dict[str, int | None]:
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_logprobs = max(prompt_logprobs or 0, self.logprobs)
        return {"logprobs": self.logprobs, "prompt_logprobs": prompt_logprobs}
