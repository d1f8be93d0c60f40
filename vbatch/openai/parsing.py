"""Decoded JSON bodies -> validated requests, every failure one `OpenAIRequestError` (400)
naming the field at fault; the model a request names -> 404 unless it is served."""
from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from vbatch.openai.errors import OpenAIRequestError, not_found
from vbatch.openai.requests import ChatCompletionRequest, CompletionRequest

Request = TypeVar("Request", bound=BaseModel)


def parse_request(model: type[Request], body: Any) -> Request:
    """`body` (decoded JSON) validated as `model`; raises OpenAIRequestError (400) naming the
    first field at fault."""
    if not isinstance(body, dict):
        raise OpenAIRequestError(
            f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        request = model.model_validate(body)
    except ValidationError as error:
        raise _readable(error) from None
    check = getattr(request, "check", None)
    if check is not None:
        check()
    return request


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """The body of a chat completion request, validated (OpenAIRequestError if not)."""
    return parse_request(ChatCompletionRequest, body)


def parse_completion_request(body: Any) -> CompletionRequest:
    """The body of a completion request, validated (OpenAIRequestError if not)."""
    return parse_request(CompletionRequest, body)


def check_model(requested: str | None, served: list[str]) -> None:
    """A request may name one of the `served` model names or none; else 404."""
    if requested is not None and requested not in served:
        raise not_found(f"The model `{requested}` does not exist; this server serves "
                        + ", ".join(f"`{name}`" for name in served), param="model",
                        code="model_not_found")


def _readable(error: ValidationError) -> OpenAIRequestError:
    errors = error.errors()
    first = errors[0]
    field = first["loc"][0] if first["loc"] else None
    if field in _UNION_HINTS and sum(e["loc"][:1] == (field,) for e in errors) > 1:
        return OpenAIRequestError(f"invalid '{field}': must be {_UNION_HINTS[field]}",
                                  param=str(field))
    # pydantic names the union member it tried ("list[int]", "str"): not part of the path
    path = [str(part) for part in first["loc"]
            if isinstance(part, int) or ("[" not in part and part not in _TYPE_TAGS)]
    param = ".".join(path) or None
    if first["type"] == "extra_forbidden":
        return OpenAIRequestError(f"unknown field '{param}': not supported, remove it",
                                  param=param)
    if first["type"] == "missing":
        return OpenAIRequestError(f"'{param}' is required", param=param)
    shown = repr(first.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return OpenAIRequestError(f"invalid '{param}': {first['msg']} (got {shown})", param=param)


_UNION_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids (integers >= 0) or a list of "
              "such lists, none of them empty",
    "stop": "a string or a list of strings",
    "content": "a string or a list of {type: text, text} parts",
}
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "TextContentPart",
              "function-after", "json-or-python", "literal"}
