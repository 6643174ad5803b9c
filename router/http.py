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

With `stream: true` a completion comes as server-sent events, `data: {chunk}` per
delta, then `data: [DONE]`. Errors are OpenAI-shaped, `{"error": {message, type,
param, code}}`: 400 for a request that cannot be served as sent, 401 without a valid
API key (when keys are configured; the health probes need none), 404 for another
model, 413 for a body over the limit, 429 with Retry-After when the router is full,
503 when it is not ready or no instance can take the request, 500 when it failed
on the workers. A client's X-Request-Id comes back on the response, untouched; it
is never used as the request's id inside tandem. router.http_guard holds the checks
before the routes and the error handlers after them.

A client that goes away ends its requests on the workers: each request's delta
generator is closed, and Router.generate sends Abort.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from proto.tandem.internal.v1 import worker_pb2
from router import __version__
from router.core import Router
from router.errors import InvalidRequestError, RouterError
from router.frontend import (
    Completion,
    SamplingOptions,
    check_delta,
    check_model,
    collect,
    prompt_token_ids,
)
from router.http_guard import RequestGuard, add_error_handlers
from router.metrics import RouterMetrics
from router.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResponseFormat,
    TokenizeRequest,
    error_body,
)
from router.sse import Deltas, EventStreamResponse, cancel_and_wait, events

T = TypeVar("T")

DEFAULT_MAX_BODY_BYTES = 8 << 20

routes = APIRouter()


def create_app(
    router: Router,
    *,
    api_keys: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics: RouterMetrics | None = None,
) -> FastAPI:
    """The HTTP app over a started router (the caller starts and closes the router).
    With `api_keys`, every route but the health probes needs `Authorization: Bearer
    <key>`."""
    app = FastAPI(title="tandem router", version=__version__)
    app.state.router = router
    app.state.metrics = router.metrics if metrics is None else metrics
    app.include_router(routes)
    add_error_handlers(app)
    app.add_exception_handler(_ClientGone, _client_gone)
    app.add_middleware(
        RequestGuard,
        api_keys=frozenset(api_keys),
        max_body_bytes=max_body_bytes,
        metrics=app.state.metrics,
    )
    return app


@routes.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    router = _router(request)
    check_model(router, body.model)
    options = body.options()
    prompts = [prompt_token_ids(router, p) for p in body.prompts()]
    response = ResponseFormat.for_request(
        "completion",
        router.model_id,
        router.new_request_id("cmpl"),
        prompts,
        body,
        options.logprobs is not None,
        _token_text(router),
    )
    return await _complete(request, body, options, prompts, response)


@routes.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    router = _router(request)
    check_model(router, body.model)
    options = body.options()
    prompt_ids = router.tokenizer.encode_chat([m.for_template() for m in body.messages])
    response = ResponseFormat.for_request(
        "chat",
        router.model_id,
        router.new_request_id("chatcmpl"),
        [prompt_ids],
        body,
        options.logprobs is not None,
        _token_text(router),
    )
    return await _complete(request, body, options, [prompt_ids], response)


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
    if router.ready:
        return JSONResponse({"status": "ready"})
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


async def _complete(
    request: Request,
    body: CompletionRequest | ChatCompletionRequest,
    options: SamplingOptions,
    prompts: list[list[int]],
    response: ResponseFormat,
) -> Response:
    """Starts every choice (prompt i's j-th sample is choice i * n + j) and answers with
    the whole completion, or streams it."""
    router = _router(request)
    params = [
        options.for_choice(j).to_params(len(prompt), router)
        for prompt in prompts
        for j in range(body.n)
    ]
    prompt_of = [prompt for prompt in prompts for _ in range(body.n)]
    ids = [response.request_id] + [f"{response.request_id}-{c}" for c in range(1, len(params))]
    choices = [router.generate(p, q, i) for p, q, i in zip(prompt_of, params, ids)]
    if body.stream:
        return await _stream(request, choices, response, body.include_usage)
    completions = await _unless_disconnected(request, _collect_all(choices))
    return JSONResponse(response.response(completions))


async def _collect_all(choices: list[Deltas]) -> list[Completion]:
    tasks = [asyncio.ensure_future(collect(c)) for c in choices]
    try:
        return await asyncio.gather(*tasks)
    finally:  # one failed, or the client left: stop the others
        await cancel_and_wait(*tasks)


async def _stream(
    request: Request, choices: list[Deltas], response: ResponseFormat, include_usage: bool
) -> Response:
    """Waits for every choice's first delta, so that a request failing before it gets
    a plain error response with its status code, then streams the rest."""
    firsts: list[worker_pb2.TokenDelta] = []
    try:
        for deltas in choices:
            first = await _unless_disconnected(request, anext(deltas))
            check_delta(first)
            firsts.append(first)
    except BaseException:
        await asyncio.gather(*(d.aclose() for d in choices), return_exceptions=True)
        raise
    return EventStreamResponse(events(choices, firsts, response, include_usage))


def _token_text(router: Router) -> Callable[[int], str]:
    tokenizer = router.tokenizer
    return lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)


class _ClientGone(Exception):
    pass


async def _unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """The awaitable's result; if the client disconnects first, it is cancelled and
    _ClientGone raised."""
    work = asyncio.ensure_future(awaitable)
    watching = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(work, watching)
    if work.cancelled():
        raise _ClientGone
    return work.result()


async def _disconnected(request: Request) -> None:
    # The body has been read by now, so the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _router(request: Request) -> Router:
    router: Router = request.app.state.router
    return router


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it; nginx's code for "client closed"
