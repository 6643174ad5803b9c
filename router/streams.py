"""One request's token stream on the router: puts the workers' deltas back in order.

A request's tokens come from two places: the prefill instance's first token and the
decode instance's Subscribe stream, which may be read first. A delta covers the
half-open range of output positions

    [delta.index, delta.index + len(delta.token_ids))

so the stream holds each delta until every position before it has been released:

    push(delta) ──▶ pending (heap by index) ──▶ ready, in order ──▶ get()

The stream closes after it releases a finished delta, or at once on fail(); after
that, pushes are dropped. It has one reader: get() is not for concurrent callers.
"""

from __future__ import annotations

import asyncio
import collections
import heapq

from proto.tandem.internal.v1 import worker_pb2


class RequestStream:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._next_index = 0  # the first output position not yet released
        self._pending: list[tuple[int, int, worker_pb2.TokenDelta]] = []  # (index, seq, delta)
        self._num_pushed = 0
        # Released deltas, and the future get() waits on while there are none. (Lighter
        # than an asyncio.Queue: every token passes here.)
        self._ready: collections.deque[worker_pb2.TokenDelta] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._finished_by_worker = False
        self.token_ids: list[int] = []  # the output tokens released, in order

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def num_released(self) -> int:
        """Output positions released to the reader so far."""
        return self._next_index

    @property
    def needs_abort(self) -> bool:
        """True until a worker has finished the request: the workers may still hold it."""
        return not self._finished_by_worker

    def push(self, delta: worker_pb2.TokenDelta) -> None:
        if self._closed:
            return
        if delta.request_id != self.request_id:  # a resumed request's workers know it
            delta.request_id = self.request_id  # by another id (InFlight.worker_id)
        if delta.index == self._next_index and not self._pending:
            self._release(delta)  # the common case: in order, nothing held back
            return
        self._num_pushed += 1
        heapq.heappush(self._pending, (delta.index, self._num_pushed, delta))
        self._release_in_order()

    def restart(self) -> None:
        """Drops the deltas held back: the request is resumed elsewhere from the tokens
        released so far, and what its old workers sent beyond them is void."""
        self._pending.clear()

    def fail(self, message: str) -> None:
        """End the stream now with an error delta (the router's, not a worker's)."""
        self._end_now("error", message)

    def abort(self) -> None:
        """End the stream now with an "abort" delta: a client asked to stop the request."""
        self._end_now("abort", "")

    def _end_now(self, finish_reason: str, error: str) -> None:
        if self._closed:
            return
        last = worker_pb2.TokenDelta(
            request_id=self.request_id,
            index=self._next_index,
            finished=True,
            finish_reason=finish_reason,
            error=error,
        )
        self._put_ready(last)
        self._close()

    async def get(self) -> worker_pb2.TokenDelta:
        while not self._ready:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._ready.popleft()

    def check_invariants(self) -> None:
        assert all(index >= self._next_index for index, _, _ in self._pending), self._pending
        if self._pending:
            assert self._pending[0][0] > self._next_index, "a releasable delta is held back"
        if self._closed:
            assert not self._pending, "a closed stream holds deltas"

    def _release_in_order(self) -> None:
        while self._pending and not self._closed:
            index, _, delta = self._pending[0]
            if index > self._next_index:
                return
            heapq.heappop(self._pending)
            if index < self._next_index:
                continue  # repeats positions already released: a duplicate
            self._release(delta)

    def _release(self, delta: worker_pb2.TokenDelta) -> None:
        self._next_index += len(delta.token_ids)
        self.token_ids.extend(delta.token_ids)
        self._put_ready(delta)
        if delta.finished:
            self._finished_by_worker = True
            self._close()

    def _put_ready(self, delta: worker_pb2.TokenDelta) -> None:
        self._ready.append(delta)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _close(self) -> None:
        self._closed = True
        self._pending.clear()
