"""POST /tokenize and POST /detokenize, with vLLM's request and response shapes.

/tokenize takes `{"prompt", "add_special_tokens": true}` or `{"messages",
"add_generation_prompt": true}` (the chat template; no extra special tokens) and answers
`{"count", "max_model_len", "tokens", "token_strs": null}`; /detokenize takes `{"tokens"}` and
answers `{"prompt"}`. Both run on the engine loop's thread, which owns the tokenizer.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from vbatch.engine.llm_engine import LLMEngine
from vbatch.entrypoints.openai.serving import ServingContext
from vbatch.openai.protocol import ChatMessage, OpenAIRequestError, check_model, parse_request
from vbatch.openai.requests import StrictModel


class TokenizeCompletionRequest(StrictModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(StrictModel):
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    add_special_tokens: bool = False


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def _tokenize(engine: LLMEngine, request: TokenizeCompletionRequest | TokenizeChatRequest
              ) -> list[int]:
    tokenizer = engine.tokenizer
    if isinstance(request, TokenizeCompletionRequest):
        return tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
    messages = [message.for_template() for message in request.messages]
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=request.add_generation_prompt)
    except Exception as error:  # noqa: BLE001 - jinja's TemplateError and what templates raise
        raise OpenAIRequestError(f"the chat template refused the messages: {error}",
                                 param="messages") from None
    return tokenizer.encode(text, add_special_tokens=request.add_special_tokens)


async def tokenize(context: ServingContext, body: Any) -> dict[str, Any]:
    """The /tokenize answer for `body` (OpenAIRequestError if it is malformed)."""
    model = TokenizeChatRequest if isinstance(body, dict) and "messages" in body \
        else TokenizeCompletionRequest
    request = parse_request(model, body)
    check_model(request.model, context.served_model_names)
    tokens = await context.client.call(lambda engine: _tokenize(engine, request))
    return {"count": len(tokens), "max_model_len": context.max_model_len, "tokens": tokens,
            "token_strs": None}


def _detokenize(engine: LLMEngine, tokens: list[int]) -> str:
    vocab_size = engine.hf_config.vocab_size
    bad = next((token for token in tokens if token >= vocab_size), None)
    if bad is not None:
        raise OpenAIRequestError(f"token id {bad} is outside the vocabulary (0.."
                                 f"{vocab_size - 1})", param="tokens")
    return engine.tokenizer.decode(tokens)


async def detokenize(context: ServingContext, body: Any) -> dict[str, Any]:
    """The /detokenize answer for `body` (OpenAIRequestError if it is malformed)."""
    request = parse_request(DetokenizeRequest, body)
    check_model(request.model, context.served_model_names)
    return {"prompt": await context.client.call(
        lambda engine: _detokenize(engine, request.tokens))}
