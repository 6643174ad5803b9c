"""tandem.Client and tandem.AsyncClient against a real router gRPC server on fake workers.

The server runs on the test's event loop, so the blocking Client is driven from a
thread (asyncio.to_thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncGenerator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tandem
from router.errors import (
    AuthenticationError,
    GenerationError,
    InvalidRequestError,
    ModelNotFoundError,
    NoInstanceError,
    NotReadyError,
    OverloadedError,
    RouterError,
)
from router.grpc_api import start_grpc_server
from tests.router.fakes import (
    MODEL_ID,
    VOCAB,
    ServedApi,
    fake_workers,
    served_api,
    started_router,
    wait_until,
)

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "user", "content": "why is the sky blue"}]


async def test_generate_stream_abort_and_list_models_with_the_blocking_client() -> None:
    async with served_api("prefill", "decode") as api:
        with tandem.Client(api.target, timeout=10) as client:
            completion = await asyncio.to_thread(
                client.generate, "the cat sat", max_tokens=2, request_id="r-1"
            )
            chunks = await asyncio.to_thread(
                lambda: list(client.generate_stream([VOCAB["hello"], VOCAB["world"]]))
            )
            chat = await asyncio.to_thread(client.chat, CHAT, stop="blue")
            (model,) = await asyncio.to_thread(client.list_models)
            found = await asyncio.to_thread(client.abort, "cmpl-none")
        assert completion.text == " the cat" and completion.finish_reason == "length"
        assert completion.token_ids == [VOCAB["the"], VOCAB["cat"]]
        assert completion.request_id == "r-1" and completion.id.startswith("cmpl-")
        assert completion.usage == tandem.Usage(4, 2, 6) and completion.model == MODEL_ID
        assert [(c.index, c.text, c.finish_reason) for c in chunks] == [
            (0, " hello", None),
            (1, " world", "stop"),
        ]
        assert chunks[0].usage is None and chunks[1].usage == tandem.Usage(2, 2, 4)
        assert chat.text == " why is the sky blue"
        assert model == tandem.Model(MODEL_ID, "tandem", 32, ["tiny-echo", "default"])
        assert found is False


async def test_generate_chat_and_streams_with_the_async_client() -> None:
    async with served_api("colocated") as api, tandem.AsyncClient(api.target) as client:
        completion = await client.generate("hello world", model="tiny-echo", request_id="a")
        chunks = [c async for c in client.generate_stream("the cat", request_id="b")]
        chat = await client.chat(CHAT, max_tokens=3)
        chat_chunks = [c async for c in client.chat_stream(CHAT, max_tokens=3)]
        models = await client.list_models()
    assert (completion.text, completion.request_id) == (" hello world", "a")
    assert [c.text for c in chunks] == [" the", " cat"]
    assert {c.request_id for c in chunks} == {"b"} and chunks[-1].finish_reason == "stop"
    assert (chat.text, chat.finish_reason) == (" why is the", "length")
    assert "".join(c.text for c in chat_chunks) == chat.text
    assert [m.id for m in models] == [MODEL_ID]


async def test_abort_ends_a_stream_in_flight() -> None:
    async with served_api("prefill", "decode") as api, tandem.AsyncClient(api.target) as client:
        api.workers[1].knobs.step_s = 0.2
        chunks = client.generate_stream("the cat sat on a mat")
        async with contextlib.aclosing(chunks):
            first = await anext(chunks)
            assert await client.abort(first.id)
            rest = [c async for c in chunks]
        assert rest[-1].finish_reason == "abort"
        await wait_until(lambda: first.id in api.workers[1].aborted)
        assert not await client.abort(first.id)


async def test_closing_a_stream_aborts_the_request_sync_and_async() -> None:
    async with served_api("prefill", "decode") as api:
        prefill, decode = api.workers
        decode.knobs.step_s = 0.2

        def first_then_close() -> str:
            with tandem.Client(api.target) as client:
                chunks = client.generate_stream("the cat sat on a mat")
                first = next(chunks)
                chunks.close()  # type: ignore[attr-defined]
                return first.id

        request_id = await asyncio.to_thread(first_then_close)
        await wait_until(lambda: request_id in prefill.aborted and request_id in decode.aborted)
        async with tandem.AsyncClient(api.target) as client:
            chunks = client.generate_stream("the cat sat on a mat")
            async with contextlib.aclosing(chunks):
                request_id = (await anext(chunks)).id
        await wait_until(lambda: request_id in decode.aborted)


@pytest.mark.parametrize(
    ("error", "client_error", "code"),
    [
        (InvalidRequestError("bad max_tokens"), tandem.InvalidRequest, "INVALID_ARGUMENT"),
        (ModelNotFoundError("no such model"), tandem.NotFound, "NOT_FOUND"),
        (NoInstanceError("no instance"), tandem.Unavailable, "UNAVAILABLE"),
        (NotReadyError("draining"), tandem.Unavailable, "UNAVAILABLE"),
        (OverloadedError("queue full", 2.5), tandem.Overloaded, "RESOURCE_EXHAUSTED"),
        (AuthenticationError("who are you"), tandem.Unauthenticated, "UNAUTHENTICATED"),
        (GenerationError("worker died"), tandem.ServerError, "INTERNAL"),
        (RouterError("something else"), tandem.ServerError, "INTERNAL"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
async def test_every_router_error_becomes_its_typed_client_error(
    monkeypatch, error, client_error, code, streaming
) -> None:
    async with served_api("colocated") as api:

        async def failing(ids, params) -> AsyncGenerator:
            raise error
            yield

        monkeypatch.setattr(api.router, "generate", failing)
        async with tandem.AsyncClient(api.target, max_retries=0) as client:
            with pytest.raises(client_error) as raised:
                if streaming:
                    [c async for c in client.generate_stream("the cat")]
                else:
                    await client.generate("the cat")
    assert type(raised.value) is client_error and raised.value.code.name == code
    assert str(error) in raised.value.message and str(error) in str(raised.value)
    if isinstance(error, OverloadedError):
        assert raised.value.retry_after == 2.5 and "retry after 2.5 s" in raised.value.message


async def test_a_timeout_is_timeout() -> None:
    async with served_api("colocated") as api, tandem.AsyncClient(api.target) as client:
        api.workers[0].knobs.step_s = 0.5
        with pytest.raises(tandem.Timeout):
            await client.generate("the cat sat", timeout=0.2)


def fail_first_calls(api: ServedApi, num_failures: int, monkeypatch) -> list[int]:
    """Make the router's first `num_failures` generate calls fail with NoInstanceError
    (UNAVAILABLE); returns the list of calls, growing."""
    calls: list[int] = []
    generate = api.router.generate

    async def flaky(ids, params) -> AsyncGenerator:
        calls.append(len(ids))
        if len(calls) <= num_failures:
            raise NoInstanceError("no instance is free; retry")
        async for delta in generate(ids, params):
            yield delta

    monkeypatch.setattr(api.router, "generate", flaky)
    return calls


async def test_unavailable_before_the_first_chunk_is_retried(monkeypatch) -> None:
    async with served_api("colocated") as api, tandem.AsyncClient(api.target) as client:
        calls = fail_first_calls(api, 2, monkeypatch)
        chunks = [c async for c in client.generate_stream("the cat")]
        assert "".join(c.text for c in chunks) == " the cat" and len(calls) == 3
        calls = fail_first_calls(api, 1, monkeypatch)
        sync_client = tandem.Client(api.target)
        completion = await asyncio.to_thread(sync_client.generate, "hello")
        sync_client.close()
        assert completion.text == " hello" and len(calls) == 2
        calls = fail_first_calls(api, 3, monkeypatch)
        with pytest.raises(tandem.Unavailable, match="no instance is free"):
            await client.generate("the cat")
        assert len(calls) == 3  # max_retries=2: three tries in all


async def test_a_stream_broken_after_its_first_chunk_raises_and_is_not_retried(
    monkeypatch,
) -> None:
    async with served_api("colocated") as api:
        calls = []
        generate = api.router.generate

        async def breaks(ids, params) -> AsyncGenerator:
            calls.append(ids)
            async with contextlib.aclosing(generate(ids, params)) as deltas:
                yield await anext(deltas)
            raise NoInstanceError("lost the worker")  # UNAVAILABLE, after a token

        monkeypatch.setattr(api.router, "generate", breaks)
        received = []
        async with tandem.AsyncClient(api.target) as client:
            with pytest.raises(tandem.Unavailable, match="lost the worker"):
                async for chunk in client.generate_stream("the cat sat"):
                    received.append(chunk.text)

        def sync_stream() -> None:
            with tandem.Client(api.target) as client:
                for chunk in client.generate_stream("the cat sat"):
                    received.append(chunk.text)

        with pytest.raises(tandem.Unavailable, match="lost the worker"):
            await asyncio.to_thread(sync_stream)
        assert received == [" the", " the"] and len(calls) == 2


async def test_a_router_that_starts_late_is_reached_by_retrying() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with fake_workers("colocated") as workers, started_router(workers) as router:
        client = tandem.AsyncClient(f"127.0.0.1:{port}", max_retries=4)
        with pytest.raises(tandem.Unavailable):
            await tandem.AsyncClient(f"127.0.0.1:{port}", max_retries=0).generate("the")
        call = asyncio.ensure_future(client.generate("the cat"))
        await asyncio.sleep(0.1)
        assert not call.done()
        server = await start_grpc_server(router, "127.0.0.1", port)
        try:
            assert (await call).text == " the cat"
        finally:
            await client.close()
            await server.stop(None)


async def test_api_keys_from_the_argument_or_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("TANDEM_API_KEY", raising=False)
    async with served_api("colocated", api_keys=["secret"]) as api:
        async with tandem.AsyncClient(api.target) as client:
            with pytest.raises(tandem.Unauthenticated, match="authorization: Bearer <key>"):
                await client.generate("the cat")
        async with tandem.AsyncClient(api.target, api_key="guess") as client:
            with pytest.raises(tandem.Unauthenticated, match="not one of this server's keys"):
                await client.list_models()
        with (
            tandem.Client(api.target, api_key="guess") as sync_client,
            pytest.raises(tandem.Unauthenticated),
        ):
            await asyncio.to_thread(lambda: list(sync_client.generate_stream("the")))
        async with tandem.AsyncClient(api.target, api_key="secret") as client:
            assert (await client.generate("the cat")).text == " the cat"
        monkeypatch.setenv("TANDEM_API_KEY", "secret")
        async with tandem.AsyncClient(api.target) as client:
            assert [m.id for m in await client.list_models()] == [MODEL_ID]
        async with grpc.aio.insecure_channel(api.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest())  # no key
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def self_signed_certificate(directory: Path) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for localhost and 127.0.0.1, made by openssl."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert.read_bytes(), key.read_bytes()


async def test_tls_with_the_servers_root_certificate(tmp_path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    async with served_api("colocated", tls=(cert, key)) as api:
        async with tandem.AsyncClient(api.target, root_certificates=cert) as client:
            assert (await client.generate("the cat")).text == " the cat"
        with tandem.Client(api.target, root_certificates=cert) as sync_client:
            chunks = await asyncio.to_thread(lambda: list(sync_client.generate_stream("hello")))
            assert [c.text for c in chunks] == [" hello"]
        async with tandem.AsyncClient(api.target, max_retries=0) as plain:
            with pytest.raises(tandem.Unavailable):  # plain text to a TLS port
                await plain.generate("the cat", timeout=5)


def test_importing_the_client_does_not_import_torch() -> None:
    code = (
        "import sys, tandem\n"
        "tandem.Client, tandem.AsyncClient, tandem.TandemClientError\n"
        "assert 'torch' not in sys.modules, 'tandem.Client imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_unknown_options_and_message_fields_are_refused_before_sending() -> None:
    with tandem.Client("127.0.0.1:1") as client:
        with pytest.raises(TypeError, match=r"unknown option.*'max_token'"):
            client.generate("hi", max_token=3)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="role, content and name"):
            client.chat([{"role": "user", "text": "hi"}])
