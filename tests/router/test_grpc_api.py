"""The public gRPC API (tandem.v1.Tandem) over a real loopback port, on fake workers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from proto.tandem.v1 import tandem_pb2, tandem_pb2_grpc
from router.grpc_api import add_to_server
from tests.router.fakes import MODEL_ID, VOCAB, FakeWorker, fake_workers, started_router, wait_until

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def serving(
    *roles: str,
) -> AsyncIterator[tuple[tandem_pb2_grpc.TandemStub, list[FakeWorker]]]:
    async with fake_workers(*roles) as workers, started_router(workers) as router:
        server = grpc.aio.server()
        add_to_server(router, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield tandem_pb2_grpc.TandemStub(channel), workers
        finally:
            await server.stop(None)


async def test_generate_from_text() -> None:
    async with serving("prefill", "decode") as (stub, _):
        reply = await stub.Generate(tandem_pb2.GenerateRequest(prompt="the cat sat"))
        assert reply.text == " the cat sat" and reply.finish_reason == "stop"
        assert list(reply.token_ids) == [VOCAB[w] for w in ("the", "cat", "sat")]
        assert reply.id.startswith("cmpl-") and reply.model == MODEL_ID
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, 3)
        assert reply.usage.total_tokens == 7


async def test_generate_stream_from_token_ids() -> None:
    async with serving("colocated") as (stub, _):
        ids = [VOCAB[w] for w in ("hello", "world", "the")]
        request = tandem_pb2.GenerateRequest(
            prompt_token_ids=ids, params=tandem_pb2.SamplingParams(max_tokens=2)
        )
        pieces = [p async for p in stub.GenerateStream(request)]
        assert [p.index for p in pieces] == [0, 1]
        assert "".join(p.text for p in pieces) == " hello world"
        assert [p.finish_reason for p in pieces] == ["", "length"]
        assert not pieces[0].HasField("usage") and pieces[-1].usage.completion_tokens == 2


async def rpc_error(
    stub: tandem_pb2_grpc.TandemStub, request: tandem_pb2.GenerateRequest, streaming: bool
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        if streaming:
            async for _ in stub.GenerateStream(request):
                pass
        else:
            await stub.Generate(request)
    return error.value


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (
            tandem_pb2.GenerateRequest(
                prompt="hi", params=tandem_pb2.SamplingParams(temperature=5)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'temperature': must be in [0, 2]",
        ),
        (tandem_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "must not be empty"),
        (
            tandem_pb2.GenerateRequest(prompt="hi", model="gpt-9"),
            grpc.StatusCode.NOT_FOUND,
            "ask for 'tiny-echo@0123abcd', 'tiny-echo', 'default'",
        ),
        (
            tandem_pb2.GenerateRequest(prompt="hi", prompt_token_ids=[6]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not both",
        ),
    ],
)
async def test_bad_requests_come_back_as_status_codes_with_their_message(
    request_, code, message, streaming
) -> None:
    async with serving("colocated") as (stub, _):
        error = await rpc_error(stub, request_, streaming)
        assert error.code() == code and message in error.details()


async def test_a_failed_handoff_is_internal_with_the_reason() -> None:
    async with serving("prefill", "decode") as (stub, workers):
        workers[0].knobs.fail_handoff = True
        error = await rpc_error(stub, tandem_pb2.GenerateRequest(prompt="the cat"), False)
        assert error.code() == grpc.StatusCode.INTERNAL
        assert "decode instance unreachable" in error.details()


async def test_cancelling_a_stream_aborts_on_prefill_and_decode() -> None:
    async with serving("prefill", "decode") as (stub, (p, d)):
        d.knobs.step_s = 0.2
        call = stub.GenerateStream(tandem_pb2.GenerateRequest(prompt="the cat sat on a mat"))
        first = await call.read()
        call.cancel()
        await wait_until(lambda: first.id in p.aborted and first.id in d.aborted)
