from __future__ import annotations

import asyncio

import pytest

from proto.tandem.internal.v1 import worker_pb2
from router.streams import RequestStream

pytestmark = pytest.mark.anyio


def delta(index: int, num_tokens: int = 1, finished: bool = False) -> worker_pb2.TokenDelta:
    return worker_pb2.TokenDelta(
        request_id="r",
        index=index,
        token_ids=list(range(100 + index, 100 + index + num_tokens)),
        finished=finished,
        finish_reason="stop" if finished else "",
    )


async def drain(stream: RequestStream) -> list[int]:
    indices = []
    while True:
        d = await asyncio.wait_for(stream.get(), 1)
        indices.append(d.index)
        if d.finished:
            return indices


async def test_deltas_come_out_in_index_order_whatever_order_they_arrive_in() -> None:
    stream = RequestStream("r")
    for d in (delta(3, finished=True), delta(1, num_tokens=2), delta(0)):
        stream.push(d)
        stream.check_invariants()
    assert await drain(stream) == [0, 1, 3]
    assert stream.closed and not stream.needs_abort


async def test_a_gap_holds_back_everything_after_it() -> None:
    stream = RequestStream("r")
    stream.push(delta(1))
    stream.push(delta(2))
    stream.check_invariants()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(stream.get(), 0.05)
    stream.push(delta(0))
    stream.push(delta(3, num_tokens=0, finished=True))
    assert await drain(stream) == [0, 1, 2, 3]


async def test_duplicates_and_deltas_after_the_finish_are_dropped() -> None:
    stream = RequestStream("r")
    stream.push(delta(0))
    stream.push(delta(0))
    stream.push(delta(1, finished=True))
    stream.push(delta(2))
    stream.check_invariants()
    assert await drain(stream) == [0, 1]
    assert not stream._ready


async def test_fail_ends_the_stream_at_once_with_an_error_delta() -> None:
    stream = RequestStream("r")
    stream.push(delta(0))
    stream.push(delta(2))
    stream.fail("decode instance gone")
    stream.check_invariants()
    assert (await stream.get()).index == 0
    error = await stream.get()
    assert (error.index, error.finished, error.finish_reason) == (1, True, "error")
    assert error.error == "decode instance gone"
    assert stream.needs_abort
    stream.push(delta(1))  # too late: dropped
    assert not stream._ready
