"""How the router's HTTP API turns a request away, as OpenAI-shaped errors.

Before the routes, RequestGuard (ASGI middleware) checks every HTTP request:

    API key (401, unless the path is a health probe) ─▶ body size (413; a chunked
    body is read here, within the bound, and replayed) ─▶ the routes

and echoes the client's X-Request-Id on whatever response comes back. After them,
the exception handlers of add_error_handlers turn the router's errors into status
codes (the table is in router.http's docstring). Each refusal is counted in the
metrics' rejections, by reason; an "overloaded" one also counts as an SLO miss.
"""

from __future__ import annotations

import hmac
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.errors import (
    GenerationError,
    InvalidRequestError,
    ModelNotFoundError,
    NoInstanceError,
    NotReadyError,
    OverloadedError,
    RouterError,
)
from router.metrics import RouterMetrics
from router.openai_protocol import error_body

PROBES = frozenset({"/health", "/ready"})  # answered without an API key


class RequestGuard:
    """ASGI middleware in front of every route: the API key (401), the body size (413),
    and the client's X-Request-Id, echoed on the response."""

    def __init__(
        self,
        app: ASGIApp,
        api_keys: frozenset[str],
        max_body_bytes: int,
        metrics: RouterMetrics | None,
    ) -> None:
        self.app = app
        self.api_keys = api_keys
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        send_with_id = send
        if b"x-request-id" in headers:
            echo = [(b"x-request-id", headers[b"x-request-id"])]

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), *echo]}
                await send(message)

        if self.api_keys and scope["path"] not in PROBES and not self._authorized(headers):
            await self._unauthorized(headers, scope, receive, send_with_id)
            return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._too_large(scope, receive, send_with_id)
            return
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # No declared length (a chunked body): read it here, within the bound, and
            # hand it on whole; FastAPI would turn an error while reading into a 400.
            buffered = bytearray()
            while True:
                incoming = await receive()
                if incoming["type"] != "http.request":
                    return  # the client left
                buffered += incoming.get("body", b"")
                if len(buffered) > self.max_body_bytes:
                    await self._too_large(scope, receive, send_with_id)
                    return
                if not incoming.get("more_body", False):
                    break
            receive = _replay(bytes(buffered), receive)
        await self.app(scope, receive, send_with_id)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        key = key.strip()
        return scheme.lower() == "bearer" and any(
            hmac.compare_digest(key, k) for k in self.api_keys
        )

    async def _unauthorized(
        self, headers: dict[bytes, bytes], scope: Scope, receive: Receive, send: Send
    ) -> None:
        message = (
            "the API key is not valid: send one of this server's keys as "
            "'Authorization: Bearer <key>'"
            if b"authorization" in headers
            else "an API key is required: send 'Authorization: Bearer <key>'"
        )
        if self.metrics is not None:
            self.metrics.rejected("unauthenticated")
        body = error_body(message, "authentication_error", code="invalid_api_key")
        await JSONResponse(body, 401)(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = (
            f"the request body is larger than {self.max_body_bytes} bytes, the most this "
            "router accepts; send a shorter prompt"
        )
        if self.metrics is not None:
            self.metrics.rejected("request_too_large")
        body = error_body(message, "invalid_request_error", code="request_too_large")
        await JSONResponse(body, 413)(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that gives `body` first, then whatever the client sends next."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def add_error_handlers(app: FastAPI) -> None:
    """Answers the router's errors (and FastAPI's validation errors) with OpenAI-shaped
    error bodies and their status codes, counting the refusals."""

    def handler(
        status_code: int, type_: str, code: str | None = None, rejection: str | None = None
    ) -> Any:
        async def handle(request: Request, exc: Exception) -> Response:
            param = exc.param if isinstance(exc, InvalidRequestError) else None
            if rejection is not None:
                _count_rejection(request, rejection)
            return JSONResponse(error_body(str(exc), type_, param, code), status_code)

        return handle

    async def overloaded(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, OverloadedError)
        _count_rejection(request, "overloaded", slo_class="default")
        body = error_body(str(exc), "rate_limit_error", code="overloaded")
        headers = {"Retry-After": str(math.ceil(exc.retry_after_s))}
        return JSONResponse(body, 429, headers=headers)

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(
        InvalidRequestError, handler(400, "invalid_request_error", None, "invalid_request")
    )
    app.add_exception_handler(
        ModelNotFoundError,
        handler(404, "invalid_request_error", "model_not_found", "invalid_request"),
    )
    app.add_exception_handler(OverloadedError, overloaded)
    app.add_exception_handler(NotReadyError, handler(503, "server_error", "not_ready", "not_ready"))
    app.add_exception_handler(
        NoInstanceError, handler(503, "server_error", "no_instance", "no_instance")
    )
    app.add_exception_handler(GenerationError, handler(500, "server_error"))
    app.add_exception_handler(RouterError, handler(500, "server_error"))


def _count_rejection(request: Request, reason: str, slo_class: str | None = None) -> None:
    """Counts a refusal; with slo_class (the server's doing), also an SLO miss."""
    metrics: RouterMetrics | None = request.app.state.metrics
    if metrics is not None:
        metrics.rejected(reason, slo_class)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    _count_rejection(request, "invalid_request")
    error = exc.errors()[0]
    param = ".".join(str(p) for p in error["loc"] if p != "body") or None
    message = f"{param}: {error['msg']}" if param else str(error["msg"])
    return JSONResponse(error_body(message, "invalid_request_error", param), 400)
