"""Helpers for integration tests: free ports, the router in a thread, worker Status calls."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx

from cluster.worker_base import channel
from proto.tandem.internal.v1 import worker_pb2 as pb
from proto.tandem.internal.v1 import worker_pb2_grpc
from router.server import serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RouterThread:
    """router.server.serve() on its own event loop thread, with real HTTP and gRPC ports."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: list[BaseException] = []
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, args=(list(addresses),), daemon=True)

    def __enter__(self) -> RouterThread:
        self._thread.start()
        if not self._ready.wait(120) or self._error:
            raise RuntimeError(f"router did not start: {self._error}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(30)

    def _run(self, addresses: list[str]) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            ready = asyncio.Event()
            self._task = asyncio.ensure_future(
                serve(addresses, "127.0.0.1", self.http_port, self.grpc_port, ready)
            )
            waiter = asyncio.ensure_future(ready.wait())
            await asyncio.wait({self._task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            self._ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:
            self._error.append(exc)
            self._ready.set()


def worker_status(address: str, check_invariants: bool = True) -> pb.InstanceStatus:
    stub = worker_pb2_grpc.WorkerStub(channel(address))
    return stub.Status(pb.StatusRequest(check_invariants=check_invariants), timeout=30)


def wait_all_free(addresses: Sequence[str], timeout: float = 60.0) -> list[pb.InstanceStatus]:
    """Polls until every worker has every block free and nothing in flight; returns Status."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = [worker_status(a) for a in addresses]
        idle = all(
            s.num_free_blocks == s.num_blocks
            and s.num_waiting + s.num_running + s.num_reserved + s.num_held == 0
            for s in statuses
        )
        if idle or time.monotonic() > deadline:
            return statuses


def complete(url: str, prompt: Any, max_tokens: int, **fields: Any) -> dict[str, Any]:
    body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    response = httpx.post(f"{url}/v1/completions", json={**body, **fields}, timeout=600)
    assert response.status_code == 200, response.text
    return dict(response.json())


def greedy_token_ids(url: str, prompts: Sequence[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy completions of every prompt, sent concurrently (so they share batches)."""
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        body = complete(url, prompts[i], max_tokens, return_token_ids=True)
        results[i] = body["choices"][0]["token_ids"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [results.get(i, []) for i in range(len(prompts))]
