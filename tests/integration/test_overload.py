"""Overload, on `tandem serve` with the real model: for a minute, requests arrive at
twice the rate the server sustains. The excess must be refused at once with 429 and
Retry-After while the admitted requests complete in full; the queues stay within
their bound, memory does not grow, and afterwards the server is healthy and every KV
block is free.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.serving import complete, tandem_serve

MAX_IN_FLIGHT = 6
MAX_TOKENS = 16
BODY = {
    "prompt": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "max_tokens": MAX_TOKENS,
    "temperature": 0.0,
    "ignore_eos": True,
}
OVERLOAD_S = 60.0


@pytest.fixture(scope="module")
def server():
    processes: list = []
    flags = ("--launcher", "local", "--dtype", "float32", "--max-in-flight", str(MAX_IN_FLIGHT))
    with tandem_serve(*flags, processes=processes) as (url, _):
        yield url, processes[0].pid


def group_rss_bytes(group_id: int) -> int:
    """Resident memory of every process in the group: the router and its workers."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group_id:  # pgrp
                total += int(fields[21]) * 4096  # rss, in pages
        except (OSError, IndexError, ValueError):
            continue  # it exited meanwhile
    return total


async def sustained_rate(url: str, seconds: float) -> float:
    """Completions per second with MAX_IN_FLIGHT clients sending back to back: the
    most the server does while admitting everything it is sent."""
    done = 0
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=120) as client:

        async def one_client() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                r = await client.post(f"{url}/v1/completions", json=BODY)
                assert r.status_code == 200, r.text
                done += 1

        started = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(MAX_IN_FLIGHT)))
        return done / (time.monotonic() - started)


async def overload(url: str, rate: float, seconds: float) -> tuple[list[httpx.Response], list]:
    """Poisson arrivals at `rate` for `seconds`; meanwhile /status every 0.5 s."""
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=500, max_keepalive_connections=100)
    statuses: list = []
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        stop = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                statuses.append((await client.get(f"{url}/status")).json())
                await asyncio.sleep(0.5)

        watcher = asyncio.ensure_future(watch())
        requests = []
        start = arrival = time.monotonic()
        while arrival < start + seconds:
            arrival += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, arrival - time.monotonic()))
            requests.append(asyncio.ensure_future(client.post(f"{url}/v1/completions", json=BODY)))
        responses = await asyncio.gather(*requests)
        stop.set()
        await watcher
    return responses, statuses


def test_twice_the_sustained_rate_for_a_minute(server):
    url, group_id = server
    rate = asyncio.run(sustained_rate(url, 10.0))
    rss_before = group_rss_bytes(group_id)

    responses, statuses = asyncio.run(overload(url, 2 * rate, OVERLOAD_S))
    rss_after = group_rss_bytes(group_id)

    codes = [r.status_code for r in responses]
    refused = [r for r in responses if r.status_code == 429]
    served = [r for r in responses if r.status_code == 200]
    summary = (
        f"{len(responses)} requests at {2 * rate:.1f}/s: {len(served)} served, "
        f"{len(refused)} refused; RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"
    )
    print(summary)
    assert len(served) + len(refused) == len(codes), (summary, sorted(set(codes)))
    # The excess is refused, and what is admitted is served at the sustained rate.
    assert len(refused) >= 0.2 * len(responses), summary
    assert len(served) >= 0.5 * rate * OVERLOAD_S, summary
    for r in refused:
        assert int(r.headers["Retry-After"]) >= 1
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "max_in_flight" in error["message"]
    for r in served:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length", choice
        assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS
    # The queues stayed within their bound the whole minute.
    assert len(statuses) >= OVERLOAD_S
    assert max(s["num_in_flight"] for s in statuses) <= MAX_IN_FLIGHT
    for status in statuses:
        for instance in status["instances"]:
            assert instance["num_waiting"] + instance["num_running"] <= MAX_IN_FLIGHT, instance
    # No memory growth beyond allocator noise over a minute of refusals.
    assert rss_after <= rss_before * 1.05 + 32 * 2**20, summary

    # Healthy afterwards: ready, serving, and every block back.
    assert httpx.get(f"{url}/ready", timeout=10).status_code == 200
    assert complete(url, BODY["prompt"], 4, ignore_eos=True)["usage"]["completion_tokens"] == 4
    status = httpx.get(f"{url}/status?check_invariants=true", timeout=30).json()
    assert status["num_in_flight"] == 0
    for instance in status["instances"]:
        assert instance["num_free_blocks"] == instance["num_blocks"], instance
        assert not instance.get("invariants_error"), instance
