"""The router's OpenAI-compatible HTTP API.

    POST /v1/completions        prompts: a text, token ids, or a list of either
    POST /v1/chat/completions   messages, rendered with the model's chat template
    GET  /v1/models             the one model served
    POST /tokenize, /detokenize text (or messages) to token ids, and back
    GET  /version               tandem's version
    GET  /health                200 while the router process runs (liveness)
    GET  /ready                 200 while it takes requests, else 503 (readiness)
    GET  /metrics               Prometheus text
    GET  /status                the workers' Status, handoff totals, requests in flight
    /admin/...                  instances, drain, live migration (router.http_admin)

With `stream: true` a completion comes as server-sent events, `data: {chunk}` per
delta, then `data: [DONE]`. Errors are OpenAI-shaped, `{"error": {message, type,
param, code}}`: 400 for a request that cannot be served as sent, 401 without a valid
API key (when keys are configured; the health probes need none), 404 for another
model, 413 for a body over the limit, 429 with Retry-After when the router is full,
503 when it is not ready or no instance can take the request, 500 when it failed
on the workers. A client's X-Request-Id comes back on the response, untouched; it
is never used as the request's id inside tandem. router.http_guard holds the checks
before the routes and the error handlers after them.

    RequestGuard ─▶ HttpApp ─┬─ POST a completion route ─▶ CompletionRoutes
                             └─ any other request ───────▶ FastAPI (the routes here)

The completion routes carry nearly all the traffic, so they are served as a plain ASGI
app (router.http_completions), without FastAPI's routing, middleware and responses.
A client that goes away ends its requests on the workers: each request's delta
generator is closed, and Router.generate sends Abort.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from router import __version__
from router.core import Router
from router.errors import InvalidRequestError, RouterError
from router.frontend import check_model
from router.http_admin import admin_routes
from router.http_completions import ENDPOINTS, CompletionRoutes
from router.http_guard import RequestGuard, add_error_handlers
from router.metrics import RouterMetrics
from router.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
)

DEFAULT_MAX_BODY_BYTES = 8 << 20

routes = APIRouter()


def create_app(
    router: Router,
    *,
    api_keys: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics: RouterMetrics | None = None,
) -> ASGIApp:
    """The HTTP app over a started router (the caller starts and closes the router).
    With `api_keys`, every route but the health probes needs `Authorization: Bearer
    <key>`."""
    metrics = router.metrics if metrics is None else metrics
    completions = CompletionRoutes(router, metrics)
    api = FastAPI(title="tandem router", version=__version__)
    api.state.router = router
    api.state.metrics = metrics
    # Served by HttpApp before FastAPI; routed here too, for FastAPI's 405 to another
    # method and its redirect of a trailing slash.
    api.router.routes += [Route(path, completions, methods=["POST"]) for path in ENDPOINTS]
    api.include_router(routes)
    api.include_router(admin_routes)
    api.openapi = _openapi(api)  # type: ignore[method-assign]
    add_error_handlers(api)
    return RequestGuard(
        HttpApp(completions, api),
        api_keys=frozenset(api_keys),
        max_body_bytes=max_body_bytes,
        metrics=metrics,
    )


class HttpApp:
    """POST to a completion route goes straight to CompletionRoutes, the hot path;
    every other request to FastAPI."""

    def __init__(self, completions: CompletionRoutes, api: FastAPI) -> None:
        self.completions = completions
        self.api = api

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine: the app's own is returned, so that this is no frame on the
        # stack that each token's wakeup of a streaming request passes through.
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in ENDPOINTS:
            return self.completions(scope, receive, send)
        return self.api(scope, receive, send)


# The completion routes' signatures, for the OpenAPI schema; CompletionRoutes serves
# them. (No docstrings: FastAPI would put them in the schema.)
async def _completions(body: CompletionRequest) -> Response:
    raise NotImplementedError


async def _chat_completions(body: ChatCompletionRequest) -> Response:
    raise NotImplementedError


def _openapi(api: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's OpenAPI schema, with the completion routes in it."""
    documented = [
        APIRoute("/v1/completions", _completions, methods=["POST"], name="completions"),
        APIRoute(
            "/v1/chat/completions", _chat_completions, methods=["POST"], name="chat_completions"
        ),
    ]

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = get_openapi(
                title=api.title, version=api.version, routes=[*documented, *api.routes]
            )
        return api.openapi_schema

    return openapi


@routes.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    router = _router(request)
    model = {
        "id": router.model_id,
        "object": "model",
        "created": 0,
        "owned_by": "tandem",
        "max_model_len": router.max_model_len,
    }
    return {"object": "list", "data": [model]}


@routes.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    router = _router(request)
    check_model(router, body.model)
    if body.messages is not None:
        ids = router.tokenizer.encode_chat([m.for_template() for m in body.messages])
    elif body.prompt is not None:
        ids = router.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    else:
        raise InvalidRequestError("send a prompt or messages", param="prompt")
    return {"tokens": ids, "count": len(ids), "max_model_len": router.max_model_len}


@routes.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    router = _router(request)
    check_model(router, body.model)
    bad = [t for t in body.tokens if not 0 <= t < router.vocab_size]
    if bad:
        raise InvalidRequestError(
            f"{bad[:5]} are not token ids (vocab size {router.vocab_size})", param="tokens"
        )
    return {"prompt": router.tokenizer.decode(body.tokens)}


@routes.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@routes.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@routes.get("/ready")
async def ready(request: Request) -> Response:
    router = _router(request)
    if router.ready:  # a store outage shows here, but routing goes on from the cache
        return JSONResponse({"status": "ready", "store": router.membership.summary()})
    reason = "draining" if router.draining else "no healthy route to the workers"
    return JSONResponse(error_body(f"not ready: {reason}", "server_error", code="not_ready"), 503)


@routes.get("/metrics")
async def metrics(request: Request) -> Response:
    registry: RouterMetrics | None = request.app.state.metrics
    if registry is None:
        raise RouterError("this router was started without metrics")
    body, content_type = registry.render()
    return Response(body, media_type=content_type)


@routes.get("/status")
async def status(request: Request, check_invariants: bool = False) -> dict[str, Any]:
    return await _router(request).status(check_invariants)


def _router(request: Request) -> Router:
    router: Router = request.app.state.router
    return router
