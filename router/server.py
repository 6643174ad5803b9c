"""One process serving the router: its HTTP and gRPC APIs in one asyncio loop.

    serve(): Router.start() ─▶ gRPC server up ─▶ HTTP server up ─▶ ready_event set
             ... until cancelled ...
             HTTP server down ─▶ gRPC server down ─▶ Router.close()

Shutting down gives requests in flight GRACE_S seconds; those still running then are
cancelled, which aborts them on the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator, Sequence

import grpc
import uvicorn

from router.core import Router, RouterConfig
from router.grpc_api import add_to_server
from router.http import create_app
from router.policy import RoutingPolicy

logger = logging.getLogger(__name__)

GRACE_S = 5


async def serve(
    worker_addresses: Sequence[str],
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 50051,
    ready_event: asyncio.Event | None = None,
    *,
    policy: RoutingPolicy | None = None,
    config: RouterConfig | None = None,
) -> None:
    """Serve until cancelled. `ready_event` is set once both APIs take requests."""
    async with Router(worker_addresses, policy, config) as router:
        grpc_server = await _start_grpc(router, host, grpc_port)
        try:
            await _serve_http(router, host, http_port, ready_event)
        finally:
            await grpc_server.stop(grace=GRACE_S)


async def _start_grpc(router: Router, host: str, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    add_to_server(router, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    logger.info("gRPC API on %s:%d", host, port)
    return server


async def _serve_http(
    router: Router, host: str, port: int, ready_event: asyncio.Event | None
) -> None:
    config = uvicorn.Config(
        create_app(router), log_level="warning", lifespan="off", timeout_graceful_shutdown=GRACE_S
    )
    server = _HttpServer(config)
    # Binding here makes a taken port an OSError, not uvicorn's sys.exit().
    with _bind(host, port) as sock:
        serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        try:
            while not (server.started or serving.done()):
                await asyncio.sleep(0.01)
            logger.info("HTTP API on http://%s:%d", host, port)
            if ready_event is not None and server.started:
                ready_event.set()
            await serving
        finally:
            server.should_exit = True
            await serving


class _HttpServer(uvicorn.Server):
    """uvicorn without its signal handlers: serve() shuts down when it is cancelled."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.contextmanager
def _bind(host: str, port: int) -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        yield sock
