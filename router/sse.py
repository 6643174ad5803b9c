"""Server-sent events for streamed completions: the choices' deltas merged into SSE
chunks, and a streaming response that stops as soon as the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from proto.tandem.internal.v1 import worker_pb2
from router.openai_protocol import ResponseFormat, error_body

Deltas = AsyncGenerator[worker_pb2.TokenDelta, None]


async def events(
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
    async with merged_choices(choices, firsts) as merged:
        async for index, delta, first in merged:
            if delta.finish_reason == "error":
                ending = sse_event(error_body(delta.error, "server_error"))
                break
            num_tokens += len(delta.token_ids)
            chunk = sse_event(response.chunk(index, delta, first))
            if not merged.last:
                yield chunk
                continue
            ending = chunk
            if include_usage:
                ending += sse_event(response.usage_chunk(num_tokens, num_cached))
    yield ending + DONE


@contextlib.asynccontextmanager
async def merged_choices(
    choices: list[Deltas], firsts: list[worker_pb2.TokenDelta]
) -> AsyncIterator[MergedChoices]:
    """(choice index, delta, is its first) from all choices, until each has finished.
    Leaving the context closes every choice (aborting the unfinished ones)."""
    merged = MergedChoices(choices, firsts)
    try:
        yield merged
    finally:
        await cancel_and_wait(*merged.pumps)
        await asyncio.gather(*(d.aclose() for d in choices), return_exceptions=True)


class MergedChoices:
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

    def __aiter__(self) -> MergedChoices:
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


DONE = b"data: [DONE]\n\n"


def sse_event(data: dict[str, Any]) -> bytes:
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
            await cancel_and_wait(writing, watching)
            await self._events.aclose()
        error = None if writing.cancelled() else writing.exception()
        if error is not None and not isinstance(error, OSError):  # OSError: client gone
            raise error


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
