"""The FastAPI app of `vbatch serve`: routes, API-key check, error bodies, metrics.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /tokenize,
POST /detokenize, GET /health (200 while the engine loop runs, else 503), GET /metrics.
Every error is OpenAI's JSON (`{"error": {message, type, param, code}}`): 400 for a body that
is not JSON, has a wrong type, an unknown field or an impossible value, 413 for a body over
`max_body_bytes` (read no further), 401 for a missing or
wrong `Authorization: Bearer` key (when one is set: every /v1 route and /tokenize,
/detokenize), 404 for an unknown model or route, 503 when the engine stopped.

A request whose client disconnects before the answer is aborted (its KV blocks freed): a
plain request is watched for the ASGI disconnect message while it runs; a stream is
cancelled by Starlette's StreamingResponse, which closes our event generator (which aborts).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vbatch.engine.llm_engine import LLMEngine
from vbatch.entrypoints.openai.engine_loop import (
    AsyncEngineClient,
    EngineLoop,
    EngineStoppedError,
)
from vbatch.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from vbatch.entrypoints.openai.serving import ServingContext
from vbatch.entrypoints.openai.serving_chat import create_chat_completion
from vbatch.entrypoints.openai.serving_completion import create_completion
from vbatch.entrypoints.openai.tokenization import detokenize, tokenize
from vbatch.openai.protocol import OpenAIRequestError, unauthorized

T = TypeVar("T")
#: Largest request body read (a long prompt as token ids is well under 1 MiB per 100k tokens).
DEFAULT_MAX_BODY_BYTES = 64 << 20
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
KNOWN_ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize",
                   "/detokenize", "/health", "/metrics")
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 405: "invalid_request_error",
                413: "invalid_request_error"}


def build_app(engine: LLMEngine, *, served_model_names: list[str],
              api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The app serving `engine` under `served_model_names` (the first is reported in
    responses). Its engine loop starts with the app and stops with it; shutting the engine
    down is the caller's business. `app.state.metrics` / `app.state.engine_loop` expose them.
    """
    metrics = ServerMetrics()
    engine_loop = EngineLoop(engine, on_change=metrics.observe_engine)
    context = ServingContext(AsyncEngineClient(engine_loop), list(served_model_names),
                             engine.max_model_len, metrics)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine_loop.start()
        metrics.observe_engine(engine)
        try:
            yield
        finally:
            engine_loop.stop()

    app = FastAPI(title="vbatch", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.metrics = metrics
    app.state.engine_loop = engine_loop
    _add_error_handlers(app)

    async def answer(request: Request, handler: Callable[[ServingContext, Any], Awaitable[Any]]
                     ) -> Response:
        body = await _json_body(request, max_body_bytes)
        result = await _unless_disconnected(request, handler(context, body))
        if result is None:          # the client left; nobody reads this
            return Response(status_code=499)
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await answer(request, create_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await answer(request, create_chat_completion)

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> Response:
        return await answer(request, tokenize)

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> Response:
        return await answer(request, detokenize)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "vbatch",
             "root": name, "max_model_len": engine.max_model_len}
            for name in context.served_model_names]})

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine_loop.is_running else 503)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    if api_key:
        app.add_middleware(ApiKeyCheck, api_key=api_key)
    app.add_middleware(RequestCounter, metrics=metrics)     # outermost: counts the 401s too
    return app


async def _json_body(request: Request, max_bytes: int) -> Any:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise OpenAIRequestError(f"the request body exceeds {max_bytes} bytes",
                                     status_code=413)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:
        raise OpenAIRequestError(f"the request body is not valid JSON: {error}") from None
    try:    # "\ud800" escapes decode to strings no tokenizer or response can encode
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise OpenAIRequestError("the request body has a lone surrogate escape (e.g. "
                                 "\\ud800): not valid Unicode text") from None
    return body


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None (work cancelled: it aborts its engine requests) when the
    client disconnects first."""
    work_task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    done, _ = await asyncio.wait({work_task, watch}, return_when=asyncio.FIRST_COMPLETED)
    if work_task in done:
        watch.cancel()
        return work_task.result()
    work_task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work_task
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error_response(status: int, message: str, error_type: str | None = None) -> JSONResponse:
    error = OpenAIRequestError(message, status_code=status,
                               error_type=error_type or _ERROR_TYPES.get(status, "error"))
    return JSONResponse(error.to_dict(), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIRequestError)
    async def request_error(_request: Request, error: OpenAIRequestError) -> JSONResponse:
        return JSONResponse(error.to_dict(), status_code=error.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(error.status_code, str(error.detail))

    @app.exception_handler(EngineStoppedError)
    async def engine_stopped(_request: Request, error: EngineStoppedError) -> JSONResponse:
        return _error_response(503, str(error), "service_unavailable")

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, error: Exception) -> JSONResponse:
        return _error_response(500, f"internal error: {type(error).__name__}: {error}",
                               "internal_server_error")


class ApiKeyCheck:
    """ASGI middleware: protected routes need `Authorization: Bearer <api_key>` (compared in
    constant time), else 401."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse(unauthorized(
                    "missing or wrong API key: send the header 'Authorization: Bearer "
                    "<key>' with the key the server was started with (--api-key)").to_dict(),
                    status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestCounter:
    """ASGI middleware: counts answered HTTP requests by endpoint and status code."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            endpoint = path if path in KNOWN_ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
