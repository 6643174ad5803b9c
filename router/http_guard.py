"""How the router's HTTP API turns a request away, as OpenAI-shaped errors.

In front of every route, RequestGuard (an ASGI wrapper) checks each HTTP request:

    API key (401, unless the path is a health probe) ─▶ body size (413; a chunked
    body is read here, within the bound, and replayed) ─▶ the routes

and echoes the client's X-Request-Id on whatever response comes back. After them,
error_response turns the router's errors into status codes (the table is _ERRORS),
and validation_error_response a body that does not validate into a 400: for FastAPI's
routes through the exception handlers of add_error_handlers, and directly for the
completion routes (router.http_completions). Each refusal is counted in the
metrics' rejections, by reason; an "overloaded" one also counts as an SLO miss.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    NoInstanceError,
    NotReadyError,
    OverloadedError,
    RouterError,
    UnknownRequestError,
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

    async def router_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RouterError)
        return error_response(exc, request.app.state.metrics)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return validation_error_response(exc.errors(), request.app.state.metrics)

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(RouterError, router_error)


def error_response(exc: RouterError, metrics: RouterMetrics | None) -> Response:
    """The OpenAI-shaped answer to one of the router's errors; a refusal is counted."""
    status_code, type_, code, rejection = next(
        _ERRORS[t] for t in type(exc).__mro__ if t in _ERRORS
    )
    if rejection is not None and metrics is not None:
        # An "overloaded" refusal is the server's doing: also an SLO miss.
        metrics.rejected(rejection, "default" if rejection == "overloaded" else None)
    param = exc.param if isinstance(exc, InvalidRequestError) else None
    headers = None
    if isinstance(exc, OverloadedError):
        headers = {"Retry-After": str(math.ceil(exc.retry_after_s))}
    return JSONResponse(error_body(str(exc), type_, param, code), status_code, headers=headers)


def validation_error_response(
    errors: Sequence[Mapping[str, Any]], metrics: RouterMetrics | None
) -> Response:
    """400 for a body that does not validate, naming the first error's field."""
    if metrics is not None:
        metrics.rejected("invalid_request")
    error = errors[0]
    param = ".".join(str(p) for p in error["loc"] if p != "body") or None
    message = f"{param}: {error['msg']}" if param else str(error["msg"])
    return JSONResponse(error_body(message, "invalid_request_error", param), 400)


# type -> (status code, error type, error code, rejection reason counted in the metrics)
_ERRORS: dict[type[RouterError], tuple[int, str, str | None, str | None]] = {
    InvalidRequestError: (400, "invalid_request_error", None, "invalid_request"),
    ModelNotFoundError: (404, "invalid_request_error", "model_not_found", "invalid_request"),
    OverloadedError: (429, "rate_limit_error", "overloaded", "overloaded"),
    NotReadyError: (503, "server_error", "not_ready", "not_ready"),
    NoInstanceError: (503, "server_error", "no_instance", "no_instance"),
    UnknownRequestError: (404, "invalid_request_error", "request_not_found", None),
    RouterError: (500, "server_error", None, None),  # GenerationError among them
}
