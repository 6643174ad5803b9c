"""One process serving the router: its HTTP and gRPC APIs in one asyncio loop.

    serve(): Router.start() ─▶ gRPC server up ─▶ HTTP server up ─▶ ready_event set
             ... until cancelled, or SIGTERM (with handle_sigterm) ...
             draining (/ready 503, gRPC health NOT_SERVING, new requests 503)
             [SIGTERM: the requests in flight finish, for up to drain_timeout_s]
             ─▶ HTTP server down ─▶ gRPC server down ─▶ Router.close()

Shutting down gives requests still in flight GRACE_S seconds more; those still running
then are cancelled, which aborts them on the workers. API keys, when given, guard both APIs
(HTTP: Authorization: Bearer; gRPC: the same in metadata); `grpc_tls` (certificate
chain PEM, private key PEM) serves gRPC over TLS.

A process that serves the router runs serve() with run(): uvloop's event loop (libuv's
sockets and timers, about 12 % less router CPU a request and a token than asyncio's
own loop), and the heap of everything imported at start frozen out of the garbage
collector, which otherwise rescans it in every full collection (another 10 %).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from starlette.types import ASGIApp

from router.config import RouterConfig
from router.core import Router
from router.grpc_api import TandemGrpcServer, start_grpc_server
from router.http import DEFAULT_MAX_BODY_BYTES, create_app
from router.membership import Membership
from router.policy import POLICIES, RoutingPolicy, make_policy

logger = logging.getLogger(__name__)

GRACE_S = 5
# Allocations (net) between young collections; 700 by default. A streamed token makes
# a few dozen short-lived objects, none in a cycle.
GC_YOUNG_THRESHOLD = 20_000


def run(main: Coroutine[Any, Any, None]) -> None:
    """Runs `main` (serve(), or what calls it) as the process's event loop, on uvloop,
    with the heap imported so far frozen (gc.freeze) and the young generation
    collected every GC_YOUNG_THRESHOLD allocations."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    uvloop.run(main)


async def serve(
    worker_addresses: Sequence[str],
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 50051,
    ready_event: asyncio.Event | None = None,
    *,
    policy: RoutingPolicy | None = None,
    config: RouterConfig | None = None,
    api_keys: Sequence[str] = (),
    grpc_tls: tuple[bytes, bytes] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    membership: Membership | None = None,
    handle_sigterm: bool = False,
) -> None:
    """Serve until cancelled, or until SIGTERM has drained it (`handle_sigterm`, on the
    main thread only). `ready_event` is set once both APIs take requests. `membership`
    holds the instance registry and its store (default: in memory)."""
    loop = asyncio.get_running_loop()
    terminated = asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals off Unix
        loop.add_signal_handler(signal.SIGUSR2, _log_tasks)
        if handle_sigterm:
            loop.add_signal_handler(signal.SIGTERM, terminated.set)
    async with Router(worker_addresses, policy, config, membership) as router:
        grpc_server = await start_grpc_server(
            router, host, grpc_port, api_keys=api_keys, tls=grpc_tls
        )
        logger.info("gRPC API on %s:%d%s", host, grpc_port, " (TLS)" if grpc_tls else "")
        app = create_app(router, api_keys=api_keys, max_body_bytes=max_body_bytes)
        http = asyncio.ensure_future(_serve_http(app, host, http_port, ready_event))
        signalled = asyncio.ensure_future(terminated.wait())
        try:
            await asyncio.wait({http, signalled}, return_when=asyncio.FIRST_COMPLETED)
            if terminated.is_set():
                await _drain(router, grpc_server)
        finally:
            signalled.cancel()
            router.drain()
            await grpc_server.set_serving(False)
            http.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await http
            await grpc_server.stop(grace=GRACE_S)


async def _drain(router: Router, grpc_server: TandemGrpcServer) -> None:
    """SIGTERM: no new requests, not ready; the requests in flight run to their end."""
    timeout_s = router.config.drain_timeout_s
    logger.info(
        "SIGTERM: draining %d requests in flight (up to %g s)", router.num_in_flight, timeout_s
    )
    router.drain()
    await grpc_server.set_serving(False)
    if await router.wait_idle(timeout_s):
        logger.info("drained: every request in flight has finished")
    else:
        logger.warning("%d requests still in flight after %g s", router.num_in_flight, timeout_s)


async def _serve_http(
    app: ASGIApp, host: str, port: int, ready_event: asyncio.Event | None
) -> None:
    config = uvicorn.Config(
        app,
        http="httptools",  # uvicorn's C parser; its h11 default is pure Python
        log_level="warning",
        access_log=False,  # below warning anyway, but uvicorn would still make each call
        lifespan="off",
        timeout_graceful_shutdown=GRACE_S,
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


def _log_tasks() -> None:
    """kill -USR2: where every asyncio task of the router is waiting, into the log."""
    for task in asyncio.all_tasks():
        stack = task.get_stack()
        frames = [f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in stack]
        logger.warning("task %s waits in %s", task.get_name(), " <- ".join(frames) or task)


class _HttpServer(uvicorn.Server):
    """uvicorn without its signal handlers: serve() shuts down when it is cancelled."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.contextmanager
def _bind(host: str, port: int) -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP.
    # Without it, an SSE chunk written right after the headers waits for the client's
    # delayed ACK (Nagle): 40 ms added to the first token.
    with socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        yield sock


def add_front_door_arguments(parser: argparse.ArgumentParser) -> None:
    """The router's flags, shared by `python -m router` and `tandem serve`."""
    parser.add_argument("--policy", default="least_loaded", choices=sorted(POLICIES))
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="a key clients must send (repeat for several); also TANDEM_API_KEYS=k1,k2",
    )
    parser.add_argument("--grpc-tls-cert", default=None, help="PEM certificate chain: gRPC TLS")
    parser.add_argument("--grpc-tls-key", default=None, help="PEM private key for --grpc-tls-cert")
    parser.add_argument("--max-in-flight", type=int, default=RouterConfig.max_in_flight)
    parser.add_argument(
        "--max-waiting-prompt-tokens", type=int, default=RouterConfig.max_waiting_prompt_tokens
    )
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20)
    parser.add_argument(
        "--migration-policy", default="off", choices=["off", "balance"],
        help="balance: migrate running requests from the most to the least loaded decode "
        "instance while their KV usage differs by more than --migration-threshold",
    )  # fmt: skip
    parser.add_argument("--migration-interval", type=float, default=1.0, help="seconds")
    parser.add_argument("--migration-threshold", type=float, default=0.2, help="0..1")


def front_door_options(args: argparse.Namespace) -> dict[str, Any]:
    """serve()'s keyword arguments from the flags above. Raises ValueError on a bad one."""
    keys = list(args.api_key)
    keys += [k.strip() for k in os.environ.get("TANDEM_API_KEYS", "").split(",") if k.strip()]
    tls = None
    if bool(args.grpc_tls_cert) != bool(args.grpc_tls_key):
        raise ValueError("--grpc-tls-cert and --grpc-tls-key go together")
    if args.grpc_tls_cert:
        tls = (Path(args.grpc_tls_cert).read_bytes(), Path(args.grpc_tls_key).read_bytes())
    if args.migration_interval <= 0 or not 0 < args.migration_threshold <= 1:
        raise ValueError("--migration-interval must be positive, --migration-threshold in (0, 1]")
    if args.max_in_flight < 1 or args.max_waiting_prompt_tokens < 1 or args.max_body_mb <= 0:
        raise ValueError(
            "--max-in-flight, --max-waiting-prompt-tokens and --max-body-mb must be positive"
        )
    return {
        "policy": make_policy(args.policy),
        "api_keys": keys,
        "grpc_tls": tls,
        "max_body_bytes": int(args.max_body_mb * 2**20),
        "config": RouterConfig(
            max_in_flight=args.max_in_flight,
            max_waiting_prompt_tokens=args.max_waiting_prompt_tokens,
            migration_policy=args.migration_policy,
            migration_interval_s=args.migration_interval,
            migration_threshold=args.migration_threshold,
        ),
    }
