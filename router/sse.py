"""Server-sent events for streamed completions: the choices' deltas merged into SSE
chunks, and the ASGI messages that carry them to the client.

    each choice's first delta ─▶ its chunk     (in choice order)
    then, as they come:         every other delta ─▶ its chunk
    the last finished choice:   its chunk + usage (if asked) + [DONE], in one piece
    an error delta:             an error event + [DONE], in one piece
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import orjson
from starlette.types import Message, Send

from proto.tandem.internal.v1 import worker_pb2
from router.frontend import check_delta
from router.openai_protocol import ResponseFormat, error_body

Deltas = AsyncGenerator[worker_pb2.TokenDelta, None]
Item = tuple[int, worker_pb2.TokenDelta, bool]  # (choice index, delta, is its first)

DONE = b"data: [DONE]\n\n"
HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


async def send_events(
    send: Send,
    choices: list[Deltas],
    response: ResponseFormat,
    include_usage: bool,
    on_ended: Callable[[], None],
) -> None:
    """Streams the choices as a text/event-stream response. First waits for every
    choice's first delta, so that a request failing before it raises (for a plain error
    response with its status code) with nothing sent. Then the chunks as they come, each
    choice's in order; usage after the last. The last piece (the final chunk, usage and
    [DONE]) is one bytes that also ends the body, so it reaches the client in one write
    with the chunked encoding's terminator; on_ended() is called right after it. Then,
    or on an error or cancellation, every choice is closed (the unfinished aborted)."""
    try:
        firsts = [check_delta(await anext(deltas)) for deltas in choices]
    except BaseException:
        await close_all(choices)
        raise
    pieces = _Pieces(response, firsts, include_usage)
    try:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        for index, first in enumerate(firsts):
            await send(pieces.message(index, first, True))
        if len(choices) > 1 and not pieces.ended:
            await _send_merged(send, pieces, choices, firsts)
        elif not pieces.ended:  # the common case, read directly: every token passes here
            async for delta in choices[0]:
                await send(pieces.message(0, delta, False))
                if pieces.ended:
                    break
        if not pieces.ended:  # a choice ended unfinished (Router.generate never does)
            await send({"type": "http.response.body", "body": DONE, "more_body": False})
        on_ended()
    finally:
        await close_all(choices)


async def _send_merged(
    send: Send, pieces: _Pieces, choices: list[Deltas], firsts: list[worker_pb2.TokenDelta]
) -> None:
    """The deltas after the firsts of several choices, as they come, until the last
    piece: each choice is pumped into one queue."""
    queue: asyncio.Queue[Item | BaseException] = asyncio.Queue()
    pumps = [
        asyncio.ensure_future(_pump(i, d, f, queue))
        for i, (d, f) in enumerate(zip(choices, firsts))
    ]
    try:
        while not pieces.ended:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            await send(pieces.message(*item))
    finally:
        await cancel_and_wait(*pumps)


class _Pieces:
    """Turns each choice's deltas into the response's body messages; `ended` turns true
    with the last (which carries [DONE] and ends the body): after the finished delta of
    the last unfinished choice, or an error."""

    def __init__(
        self, response: ResponseFormat, firsts: list[worker_pb2.TokenDelta], include_usage: bool
    ) -> None:
        self.ended = False
        self._response = response
        self._include_usage = include_usage
        self._num_unfinished = len(firsts)
        self._num_tokens = 0
        self._num_cached = sum(f.num_cached_tokens for f in firsts)

    def message(self, index: int, delta: worker_pb2.TokenDelta, first: bool) -> Message:
        piece = self._piece(index, delta, first)
        return {"type": "http.response.body", "body": piece, "more_body": not self.ended}

    def _piece(self, index: int, delta: worker_pb2.TokenDelta, first: bool) -> bytes:
        if delta.finish_reason == "error":
            self.ended = True
            return sse_event(error_body(delta.error, "server_error")) + DONE
        self._num_tokens += len(delta.token_ids)
        chunk = _event(self._response.chunk_json(index, delta, first))
        self._num_unfinished -= delta.finished
        if self._num_unfinished:
            return chunk
        self.ended = True
        if self._include_usage:
            usage = self._response.usage_chunk(self._num_tokens, self._num_cached)
            chunk += sse_event(usage)
        return chunk + DONE


async def _pump(
    index: int,
    deltas: Deltas,
    first: worker_pb2.TokenDelta,
    queue: asyncio.Queue[Item | BaseException],
) -> None:
    """Puts a choice's deltas after its first in the queue, until its finished one."""
    if first.finished:
        return
    try:
        async for delta in deltas:
            queue.put_nowait((index, delta, False))
            if delta.finished:
                return
    except Exception as exc:
        queue.put_nowait(exc)


def sse_event(data: dict[str, Any]) -> bytes:
    return _event(orjson.dumps(data))


def _event(data: bytes) -> bytes:
    return b"data: %s\n\n" % data


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


async def close_all(generators: Sequence[AsyncGenerator[Any, None]]) -> None:
    """Closes each generator in turn (a request's generator aborts it on the workers);
    an error while closing one does not keep the others open."""
    for generator in generators:
        with contextlib.suppress(Exception):
            await generator.aclose()
