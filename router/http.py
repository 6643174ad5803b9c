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
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

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

T = TypeVar("T")
Deltas = AsyncGenerator[worker_pb2.TokenDelta, None]

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
        await _cancel_and_wait(*tasks)


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
    return EventStreamResponse(_events(choices, firsts, response, include_usage))


async def _events(
    choices: list[Deltas],
    firsts: list[worker_pb2.TokenDelta],
    response: ResponseFormat,
    include_usage: bool,
) -> AsyncGenerator[bytes, None]:
    """The choices' chunks as they come, each choice's in order; usage after the last.
    The last piece (the final chunk, usage and [DONE]) is one bytes, so it reaches the
    client in one write."""
    num_tokens = 0
    num_cached = sum(f.num_cached_tokens for f in firsts)
    ending = b""
    async with _merged(choices, firsts) as merged:
        async for index, delta, first in merged:
            if delta.finish_reason == "error":
                ending = _event(error_body(delta.error, "server_error"))
                break
            num_tokens += len(delta.token_ids)
            chunk = _event(response.chunk(index, delta, first))
            if not merged.last:
                yield chunk
                continue
            ending = chunk
            if include_usage:
                ending += _event(response.usage_chunk(num_tokens, num_cached))
    yield ending + DONE


@contextlib.asynccontextmanager
async def _merged(
    choices: list[Deltas], firsts: list[worker_pb2.TokenDelta]
) -> AsyncIterator[_Merged]:
    """(choice index, delta, is its first) from all choices, until each has finished.
    Leaving the context closes every choice (aborting the unfinished ones)."""
    merged = _Merged(choices, firsts)
    try:
        yield merged
    finally:
        await _cancel_and_wait(*merged.pumps)
        await asyncio.gather(*(d.aclose() for d in choices), return_exceptions=True)


class _Merged:
    """Iterates (choice index, delta, is its first) over every choice until each has
    finished; `last` turns true with the item that finishes the final choice. One choice
    (the common case) is read directly; several are pumped into one queue."""

    def __init__(self, choices: list[Deltas], firsts: list[worker_pb2.TokenDelta]) -> None:
        self.last = False
        self._choices = choices
        self._firsts = firsts
        self._remaining = len(choices)
        self._queue: asyncio.Queue[tuple[int, worker_pb2.TokenDelta, bool] | BaseException]
        self.pumps: list[asyncio.Future[None]] = []
        if len(choices) == 1:
            self._items = self._only_choice()
        else:
            self._queue = asyncio.Queue()
            self.pumps = [asyncio.ensure_future(self._pump(i, d)) for i, d in enumerate(choices)]
            self._items = self._from_queue()

    def __aiter__(self) -> _Merged:
        return self

    async def __anext__(self) -> tuple[int, worker_pb2.TokenDelta, bool]:
        if self.last:
            raise StopAsyncIteration
        item = await anext(self._items)
        if item[1].finished:
            self._remaining -= 1
            self.last = self._remaining == 0
        return item

    async def _only_choice(self) -> AsyncIterator[tuple[int, worker_pb2.TokenDelta, bool]]:
        delta = self._firsts[0]
        yield 0, delta, True
        while not delta.finished:
            delta = await anext(self._choices[0])
            yield 0, delta, False

    async def _pump(self, index: int, deltas: Deltas) -> None:
        try:
            delta = self._firsts[index]
            self._queue.put_nowait((index, delta, True))
            while not delta.finished:
                delta = await anext(deltas)
                self._queue.put_nowait((index, delta, False))
        except Exception as exc:
            self._queue.put_nowait(exc)

    async def _from_queue(self) -> AsyncIterator[tuple[int, worker_pb2.TokenDelta, bool]]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item


def _token_text(router: Router) -> Callable[[int], str]:
    tokenizer = router.tokenizer
    return lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)


DONE = b"data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> bytes:
    return b"data: %s\n\n" % orjson.dumps(data)


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop, and close their source, as soon as the client goes
    away: on an http.disconnect message or a failed write, whichever comes first.
    (Starlette alone notices only the one its ASGI version implies, and leaves closing
    the source to the garbage collector.)"""

    def __init__(self, events: AsyncGenerator[bytes, None]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.headers["Cache-Control"] = "no-cache"
        self._events = events

    async def stream_response(self, send: Send) -> None:
        """As Starlette's, but the piece that ends with [DONE] also ends the body, so
        the chunked encoding's terminator goes out in the same write."""
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        async for chunk in self._events:
            ended = chunk.endswith(DONE)
            await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
            if ended:
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writing = asyncio.ensure_future(self.stream_response(send))
        watching = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({writing, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel_and_wait(writing, watching)
            await self._events.aclose()
        error = None if writing.cancelled() else writing.exception()
        if error is not None and not isinstance(error, OSError):  # OSError: client gone
            raise error


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
        await _cancel_and_wait(work, watching)
    if work.cancelled():
        raise _ClientGone
    return work.result()


async def _disconnected(request: Request) -> None:
    # The body has been read by now, so the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _router(request: Request) -> Router:
    router: Router = request.app.state.router
    return router


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it; nginx's code for "client closed"
