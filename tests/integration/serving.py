"""Helpers for integration tests: free ports, `tandem serve` as a subprocess, the router
in a thread, worker Status calls."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest

from cluster.worker_base import channel
from proto.tandem.internal.v1 import worker_pb2 as pb
from proto.tandem.internal.v1 import worker_pb2_grpc
from router.server import serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def tandem_serve(
    *flags: str,
    env: dict[str, str] | None = None,
    ready_path: str = "/health",
    stop_signal: int = signal.SIGTERM,
    processes: list[subprocess.Popen[str]] | None = None,
) -> Iterator[tuple[str, int]]:
    """`tandem serve FLAGS` on free ports until `ready_path` answers 200; yields its HTTP
    URL and gRPC port. Afterwards `stop_signal` stops it, and it must exit cleanly. The
    process (the leader of a new process group, its workers' too) goes in `processes`."""
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "tandem.cli", "serve", *flags]
    command += ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=None if env is None else {**os.environ, **env},
    )
    if processes is not None:
        processes.append(process)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(process.stdout or []), daemon=True).start()
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}{ready_path}", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        process.kill()
        pytest.fail("tandem serve did not come up:\n" + "".join(log[-40:]))
    try:
        yield url, grpc_port
    finally:
        process.send_signal(stop_signal)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGUSR2)  # its asyncio tasks' stacks, into the log
            time.sleep(1)
            process.send_signal(signal.SIGUSR1)  # its threads' stacks
            time.sleep(2)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, "".join(log[-300:])


class RouterThread:
    """router.server.serve() on its own event loop thread, with real HTTP and gRPC ports;
    `serve_options` go to serve() (policy, config, ...)."""

    def __init__(self, addresses: Sequence[str], **serve_options: Any) -> None:
        self._serve_options = serve_options
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
                serve(
                    addresses,
                    "127.0.0.1",
                    self.http_port,
                    self.grpc_port,
                    ready,
                    **self._serve_options,
                )
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


def metric_samples(url: str, names: Sequence[str]) -> dict[str, float]:
    """The router's samples of the metrics `names`, keyed `name{labels}` without the
    model_name label that every sample has."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(tuple(names)):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            pairs = labels.rstrip("}").split(",") if labels else []
            label = ",".join(x for x in pairs if not x.startswith("model_name="))
            values[f"{name}{{{label}}}"] = float(value)
    return values


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
