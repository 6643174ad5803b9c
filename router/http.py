"""The router's OpenAI-compatible HTTP API.

    POST /v1/completions        a prompt: text, or token ids
    POST /v1/chat/completions   messages, rendered with the model's chat template
    GET  /v1/models             the one model served
    GET  /health                200 while the router runs
    GET  /status                the workers' Status, handoff totals, requests in flight

With `stream: true` a completion comes as server-sent events, `data: {chunk}` per
delta, then `data: [DONE]`. Errors are OpenAI-shaped, `{"error": {message, type,
param, code}}`: 400 for a request that cannot be served as sent, 404 for another
model, 503 when no instance can take it, 500 when it failed on the workers.

A client that goes away ends its request on the workers: the request's delta
generator is closed, and Router.generate sends Abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from proto.tandem.internal.v1 import worker_pb2
from router.core import Router
from router.errors import (
    GenerationError,
    InvalidRequestError,
    ModelNotFoundError,
    NoInstanceError,
    RouterError,
)
from router.frontend import check_delta, check_model, collect, prompt_token_ids
from router.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseFormat,
    error_body,
)

T = TypeVar("T")
Deltas = AsyncGenerator[worker_pb2.TokenDelta, None]

routes = APIRouter()


def create_app(router: Router) -> FastAPI:
    """The HTTP app over a started router (the caller starts and closes the router)."""
    app = FastAPI(title="tandem router")
    app.state.router = router
    app.include_router(routes)
    _add_error_handlers(app)
    return app


@routes.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    router = _router(request)
    check_model(router, body.model)
    prompt_ids = prompt_token_ids(router, body.prompt)
    response = ResponseFormat.for_request("completion", router.model_id, prompt_ids, body)
    return await _complete(request, body, prompt_ids, response)


@routes.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    router = _router(request)
    check_model(router, body.model)
    prompt_ids = router.tokenizer.encode_chat([m.for_template() for m in body.messages])
    response = ResponseFormat.for_request("chat", router.model_id, prompt_ids, body)
    return await _complete(request, body, prompt_ids, response)


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


@routes.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@routes.get("/status")
async def status(request: Request, check_invariants: bool = False) -> dict[str, Any]:
    return await _router(request).status(check_invariants)


async def _complete(
    request: Request,
    body: CompletionRequest | ChatCompletionRequest,
    prompt_ids: list[int],
    response: ResponseFormat,
) -> Response:
    router = _router(request)
    params = body.options().to_params(len(prompt_ids), router)
    deltas = router.generate(prompt_ids, params)
    if body.stream:
        return await _stream(request, deltas, response, body.include_usage)
    completion = await _unless_disconnected(request, collect(deltas))
    return JSONResponse(response.response(completion))


async def _stream(
    request: Request, deltas: Deltas, response: ResponseFormat, include_usage: bool
) -> Response:
    """Waits for the first delta, so that a request failing before it gets a plain error
    response with its status code, then streams the rest."""
    try:
        first = await _unless_disconnected(request, anext(deltas))
        check_delta(first)
    except BaseException:
        await deltas.aclose()
        raise
    return EventStreamResponse(_events(deltas, first, response, include_usage))


async def _events(
    deltas: Deltas, first: worker_pb2.TokenDelta, response: ResponseFormat, include_usage: bool
) -> AsyncGenerator[str, None]:
    num_tokens = 0
    async with contextlib.aclosing(deltas):
        delta = first
        while True:
            if delta.finish_reason == "error":
                yield _event(error_body(delta.error, "server_error"))
                break
            num_tokens += len(delta.token_ids)
            yield _event(response.chunk(delta, first=delta is first))
            if delta.finished:
                if include_usage:
                    yield _event(response.usage_chunk(delta.request_id, num_tokens))
                break
            delta = await anext(deltas)
    yield "data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop, and close their source, as soon as the client goes
    away: on an http.disconnect message or a failed write, whichever comes first.
    (Starlette alone notices only the one its ASGI version implies, and leaves closing
    the source to the garbage collector.)"""

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.headers["Cache-Control"] = "no-cache"
        self._events = events

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


def _add_error_handlers(app: FastAPI) -> None:
    def handler(status_code: int, type_: str, code: str | None = None) -> Any:
        async def handle(request: Request, exc: Exception) -> Response:
            param = exc.param if isinstance(exc, InvalidRequestError) else None
            return JSONResponse(error_body(str(exc), type_, param, code), status_code)

        return handle

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(InvalidRequestError, handler(400, "invalid_request_error"))
    app.add_exception_handler(
        ModelNotFoundError, handler(404, "invalid_request_error", "model_not_found")
    )
    app.add_exception_handler(NoInstanceError, handler(503, "server_error", "no_instance"))
    app.add_exception_handler(GenerationError, handler(500, "server_error"))
    app.add_exception_handler(RouterError, handler(500, "server_error"))
    app.add_exception_handler(_ClientGone, _client_gone)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    error = exc.errors()[0]
    param = ".".join(str(p) for p in error["loc"] if p != "body") or None
    message = f"{param}: {error['msg']}" if param else str(error["msg"])
    return JSONResponse(error_body(message, "invalid_request_error", param), 400)


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it; nginx's code for "client closed"
