"""POST /v1/completions and /v1/chat/completions, the router's hot routes, as a plain
ASGI app: no Starlette routing, middleware or Response objects between uvicorn and the
request, and no task of its own beyond one that listens for the client leaving.

    RequestGuard (401, 413) ─▶ read the body ─▶ validate it (400) ─▶ tokenize ─▶
    Router.generate per choice (429, 503) ─▶ the first delta of every choice (500) ─▶
    the whole completion as JSON, or server-sent events until [DONE]

The errors are answered as FastAPI answers them on the other routes (router.http_guard
holds both), and the body is read as FastAPI reads it: JSON when the Content-Type says
so, otherwise the raw bytes, which do not validate. A client that leaves cancels the
request's task (ClientWatch), which closes every choice's generator: Router.generate
then sends Abort to the workers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from router.core import Router
from router.errors import RouterError
from router.frontend import Completion, check_model, collect, prompt_token_ids
from router.http_guard import error_response, validation_error_response
from router.metrics import RouterMetrics
from router.openai_protocol import ChatCompletionRequest, CompletionRequest, ResponseFormat
from router.sse import Deltas, cancel_and_wait, send_events

Body = CompletionRequest | ChatCompletionRequest


@dataclass(frozen=True)
class Endpoint:
    kind: Literal["completion", "chat"]
    body_type: type[CompletionRequest] | type[ChatCompletionRequest]
    id_prefix: str


ENDPOINTS = {
    "/v1/completions": Endpoint("completion", CompletionRequest, "cmpl"),
    "/v1/chat/completions": Endpoint("chat", ChatCompletionRequest, "chatcmpl"),
}


class CompletionRoutes:
    """The ASGI app of ENDPOINTS' paths (POST only; the caller routes them here)."""

    def __init__(self, router: Router, metrics: RouterMetrics | None) -> None:
        self.router = router
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = ENDPOINTS[scope["path"]]
        try:
            raw = await _read_body(receive)
            if raw is None:
                return  # the client left
            body = parse_body(endpoint.body_type, raw, _content_type(scope))
            with ClientWatch(receive) as watch:
                await self._start(endpoint, body, Reply(scope, receive, send, watch))
        except BodyError as exc:
            await validation_error_response(exc.errors, self.metrics)(scope, receive, send)
        except RouterError as exc:
            await error_response(exc, self.metrics)(scope, receive, send)

    def _start(self, endpoint: Endpoint, body: Body, reply: Reply) -> Awaitable[None]:
        """Starts every choice (prompt i's j-th sample is choice i * n + j); returns what
        answers with the whole completion, or streams it. (Not a coroutine itself, so
        that it is no frame on the stack each token's wakeup passes through.)"""
        router = self.router
        check_model(router, body.model)
        options = body.options()
        if isinstance(body, ChatCompletionRequest):
            messages = [m.for_template() for m in body.messages]
            prompts = [router.tokenizer.encode_chat(messages)]
        else:
            prompts = [prompt_token_ids(router, p) for p in body.prompts()]
        response = ResponseFormat.for_request(
            endpoint.kind,
            router.model_id,
            router.new_request_id(endpoint.id_prefix),
            prompts,
            body,
            options.logprobs is not None,
            _token_text(router),
        )
        params = [
            options.for_choice(j).to_params(len(prompt), router)
            for prompt in prompts
            for j in range(body.n)
        ]
        prompt_of = [prompt for prompt in prompts for _ in range(body.n)]
        ids = [response.request_id] + [f"{response.request_id}-{c}" for c in range(1, len(params))]
        choices = [router.generate(p, q, i) for p, q, i in zip(prompt_of, params, ids)]
        if body.stream:
            return send_events(reply.send, choices, response, body.include_usage, reply.watch.stop)
        return _complete(reply, choices, response)


@dataclass(frozen=True)
class Reply:
    """Where a request's answer goes, and the watch on its client."""

    scope: Scope
    receive: Receive
    send: Send
    watch: ClientWatch


async def _complete(reply: Reply, choices: list[Deltas], response: ResponseFormat) -> None:
    completions = await _collect_all(choices)
    reply.watch.stop()
    await JSONResponse(response.response(completions))(reply.scope, reply.receive, reply.send)


async def _collect_all(choices: list[Deltas]) -> list[Completion]:
    if len(choices) == 1:
        return [await collect(choices[0])]
    tasks = [asyncio.ensure_future(collect(c)) for c in choices]
    try:
        return await asyncio.gather(*tasks)
    finally:  # one failed, or the client left: stop the others
        await cancel_and_wait(*tasks)


class ClientWatch:
    """While entered, a client that disconnects cancels the task that entered it; the
    exit then swallows that cancellation. One task listens (the server's receive()),
    where a task per awaited step used to. Enter it once the body has been read: the
    next message is then the disconnect, or the end of the response, so stop() must be
    called as soon as the last byte of the response is sent."""

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self._receive = receive
        self._task: asyncio.Task[Any] | None = None
        self._listening: asyncio.Future[Any] | None = None

    def __enter__(self) -> ClientWatch:
        self._task = asyncio.current_task()
        self._listen()
        return self

    def stop(self) -> None:
        if self._listening is not None:
            self._listening.remove_done_callback(self._on_message)
            self._listening.cancel()

    def _listen(self) -> None:
        self._listening = asyncio.ensure_future(self._receive())
        self._listening.add_done_callback(self._on_message)

    def _on_message(self, listening: asyncio.Future[Any]) -> None:
        if listening.cancelled() or self._task is None:
            return
        if listening.exception() is None and listening.result()["type"] == "http.request":
            self._listen()  # more of a body already read: not a disconnect
            return
        self.gone = True
        self._task.cancel()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self.stop()
        if self.gone and exc_type is asyncio.CancelledError and self._task is not None:
            # Swallow only our own cancel; one from anyone else (shutdown) must go on.
            return self._task.uncancel() == 0  # True: the client left, nobody to answer
        return False


class BodyError(Exception):
    """A body that does not validate; `errors` as pydantic (or FastAPI) lists them."""

    def __init__(self, errors: Sequence[Mapping[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


def parse_body(body_type: type[BaseModel], raw: bytes, content_type: str | None) -> Any:
    """`raw` as FastAPI reads a JSON body (strict about the Content-Type) into the body
    type. Raises BodyError."""
    if not raw:
        raise BodyError([{"loc": ("body",), "msg": "Field required"}])
    data: Any = raw
    if content_type is not None and _is_json(content_type):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BodyError([{"loc": ("body", e.pos), "msg": "JSON decode error"}]) from None
    try:
        return body_type.model_validate(data, from_attributes=True)  # as FastAPI does
    except ValidationError as e:
        raise BodyError(e.errors()) from None


def _is_json(content_type: str) -> bool:
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type == "application/json":
        return True
    main, slash, sub = media_type.partition("/")
    return main == "application" and bool(slash) and "/" not in sub and sub.endswith("+json")


def _content_type(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return str(value.decode("latin-1"))
    return None


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body; None if the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _token_text(router: Router) -> Callable[[int], str]:
    tokenizer = router.tokenizer
    return lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)
