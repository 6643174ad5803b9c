"""serve(): both APIs in one loop, up when ready_event is set, down on cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from pathlib import Path

import grpc
import httpx
import pytest

from proto.tandem.v1 import tandem_pb2, tandem_pb2_grpc
from router.server import _bind, serve
from tests.router.fakes import fake_workers

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_serve_answers_http_and_grpc_then_shuts_down_on_cancel() -> None:
    http_port, grpc_port = free_port(), free_port()
    async with fake_workers("prefill", "decode") as workers:
        ready = asyncio.Event()
        addresses = [w.address for w in workers]
        server = asyncio.ensure_future(serve(addresses, "127.0.0.1", http_port, grpc_port, ready))
        await asyncio.wait_for(ready.wait(), 10)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as client:
            assert (await client.get("/health")).status_code == 200
            r = await client.post("/v1/completions", json={"prompt": "the cat"})
            assert r.json()["choices"][0]["text"] == " the cat"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = await tandem_pb2_grpc.TandemStub(channel).Generate(
                tandem_pb2.GenerateRequest(prompt="a mat", model="default")
            )
            assert reply.text == " a mat"
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(server, 10)
        with pytest.raises(httpx.ConnectError):
            await httpx.AsyncClient().get(f"http://127.0.0.1:{http_port}/health")


async def test_a_taken_http_port_is_an_os_error() -> None:
    async with fake_workers("colocated") as workers:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(OSError):
                await serve([workers[0].address], "127.0.0.1", port, free_port())


async def test_python_m_router_serves_until_sigterm() -> None:
    http_port = free_port()
    async with fake_workers("colocated") as workers:
        process = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "router", "--workers", workers[0].address],
            *["--http-port", str(http_port), "--grpc-port", str(free_port())],
            cwd=ROOT,
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as client:
                for _ in range(200):
                    with contextlib.suppress(httpx.ConnectError):
                        if (await client.get("/health")).status_code == 200:
                            break
                    await asyncio.sleep(0.05)
                r = await client.post("/v1/completions", json={"prompt": "the cat"})
                assert r.json()["choices"][0]["text"] == " the cat"
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 10) == 0
        finally:
            if process.returncode is None:
                process.kill()


async def test_http_connections_are_accepted_with_tcp_nodelay() -> None:
    """Without TCP_NODELAY, a streamed chunk written right after the response headers
    waits for the client's delayed ACK: 40 ms added to the first token under load."""
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    with _bind("127.0.0.1", 0) as sock:  # as serve() binds its HTTP port
        server = await asyncio.get_running_loop().create_server(Accept, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        assert await asyncio.wait_for(accepted, 5) != 0
        writer.close()
        server.close()
