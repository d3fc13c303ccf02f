"""The ASGI application: routes of both APIs, the key check, the body-size cap, CORS, metrics,
and every error answered in the shape of the API it was asked through."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import APIRouter, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import Field
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine.requests import QueueFull
from ..engine.stream import check_utf8
from ..errors import UserError
from . import anthropic_api, openai_api
from .errors import ApiError, error_response
from .prompts import ApiModel
from .state import ServerState
from .worker import NotReady

log = logging.getLogger("mlxllm.server")

RETRY_AFTER = {"Retry-After": "1"}
PUBLIC_PATHS = ("/health",)


class _JSONBodies:
    """Every body is read as JSON, whatever its declared type (``curl -d`` says form data), and one
    over ``limit`` bytes is refused with 413, whether its length is declared or not: the body is read
    here (it is small), then handed on whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
        scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        declared = dict(headers).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _too_large(scope, receive, send, self.limit)
        body, first = bytearray(), None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # the client left while sending: the app sees that
                break
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await _too_large(scope, receive, send, self.limit)
            if not message.get("more_body", False):
                break
        pending = [first or {"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    response = error_response(scope["path"], 413, f"the request body is over {limit} bytes")
    await response(scope, receive, send)


class TokenizeRequest(ApiModel):
    content: str
    add_special: bool = False


class DetokenizeRequest(ApiModel):
    tokens: list[int] = Field(max_length=1 << 20)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "the request is not valid", None
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    return (f"{where}: {first.get('msg')}" if where else str(first.get("msg"))), where or None


service = APIRouter()  # health, metrics and the tokenizer, next to the two APIs' routers


@service.get("/health")
async def _health(request: HTTPRequest) -> JSONResponse:
    worker = request.app.state.server.worker
    if worker.ready:
        return JSONResponse({"status": "ok"})
    if worker.load_error:
        return JSONResponse({"status": "error", "error": worker.load_error}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503, headers=RETRY_AFTER)


@service.get("/metrics")
async def _prometheus(request: HTTPRequest) -> Response:
    metrics = request.app.state.server.worker.metrics
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@service.post("/tokenize")
async def _tokenize(body: TokenizeRequest, request: HTTPRequest) -> dict[str, Any]:
    tokenizer = request.app.state.server.tokenizer()
    return {"tokens": tokenizer.encode(check_utf8(body.content, "content"), add_special_tokens=body.add_special)}


@service.post("/detokenize")
async def _detokenize(body: DetokenizeRequest, request: HTTPRequest) -> dict[str, Any]:
    tokenizer = request.app.state.server.tokenizer()
    if any(not 0 <= t < tokenizer.vocab_size for t in body.tokens):
        raise UserError(f"token ids must be in [0, {tokenizer.vocab_size})")
    return {"content": tokenizer.decode(body.tokens)}


async def _error(request: HTTPRequest, exc: Exception) -> JSONResponse:
    """Whatever a route raised, answered in the shape of the API it was asked through."""
    path = request.url.path
    if isinstance(exc, RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(path, 400, message, param=param)
    if isinstance(exc, UserError):
        return error_response(path, 400, str(exc))
    if isinstance(exc, ApiError):
        return error_response(path, exc.status, str(exc), exc.headers)
    if isinstance(exc, QueueFull):
        return error_response(path, 503, f"the server is busy ({exc}); retry shortly", RETRY_AFTER)
    if isinstance(exc, NotReady):
        return error_response(path, 503, f"not ready: {exc}", RETRY_AFTER)
    if isinstance(exc, HTTPException):
        return error_response(path, exc.status_code, str(exc.detail), getattr(exc, "headers", None))
    log.exception("request failed", exc_info=exc)
    return error_response(path, 500, f"internal error: {type(exc).__name__}")


def create_app(state: ServerState, *, api_key: str | None = None, cors_origins: tuple[str, ...] = (),
               max_body_bytes: int = 4 << 20) -> FastAPI:
    """The app for one served model; whoever serves it also runs ``state.worker`` (``launch.run_server``)."""
    app = FastAPI(title="mlxllm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    metrics = state.worker.metrics
    for router in (openai_api.router, anthropic_api.router, service):
        app.include_router(router)
    for kind in (RequestValidationError, UserError, ApiError, QueueFull, NotReady, HTTPException, Exception):
        app.add_exception_handler(kind, _error)

    @app.middleware("http")
    async def check_key_and_count(request: HTTPRequest, call_next):
        path = request.url.path
        if api_key is not None and path not in PUBLIC_PATHS and request.method != "OPTIONS":
            bearer = request.headers.get("authorization", "")
            given = bearer[7:] if bearer.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                response = error_response(path, 401, "a valid API key is required (Authorization: Bearer KEY or x-api-key)")
                metrics.requests.labels(_endpoint(request), "401").inc()
                return response
        try:
            response = await call_next(request)
        except Exception:
            metrics.requests.labels(_endpoint(request), "500").inc()
            raise
        metrics.requests.labels(_endpoint(request), str(response.status_code)).inc()
        return response

    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["*"])
    app.add_middleware(_JSONBodies, limit=max_body_bytes)
    return app


def _endpoint(request: HTTPRequest) -> str:
    """The route's path (not the raw one: unknown paths all count as one label)."""
    route = request.scope.get("route")
    return getattr(route, "path", "other")
