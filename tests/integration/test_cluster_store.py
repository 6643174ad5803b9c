"""The instance registry on a real Redis, with real workers and a real router: a flushed,
hung or stopped Redis holds no request and loses no instance; an instance unlike its
pool is refused; a worker that stops answering leaves routing and comes back."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from cluster.deployment import Deployment, DeploymentOptions
from cluster.launcher import LocalLauncher
from cluster.registry import Registry
from cluster.spec import WorkerSpec
from cluster.store import RedisStore
from router.membership import Membership
from tests.cluster.redis_server import RedisServer
from tests.integration.serving import RouterThread, greedy_token_ids, wait_all_free

TTL_S = 2.0
PROMPTS = [[1, 504, 3458, 282, 2 + i, 1083, 30, 216, 5248, 314] for i in range(4)]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def workers() -> Iterator[tuple[Deployment, list[str]]]:
    options = DeploymentOptions(
        decode_instances=2, dtype="float32", launcher="local", max_num_batched_tokens=256
    )
    deployment = Deployment(options)
    try:
        yield deployment, deployment.start()
    finally:
        deployment.stop()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer.start()
    yield server
    server.close()


@pytest.fixture
def cluster(workers, redis_server) -> Iterator[tuple[RouterThread, list[str], RedisServer, str]]:
    """A router whose registry lives in the private Redis, under a prefix of its own."""
    _, addresses = workers
    if redis_server.process.poll() is not None:
        redis_server.start_again()
    prefix = f"tandem-test:{uuid.uuid4().hex[:8]}:"
    membership = Membership(Registry(RedisStore(redis_server.url, prefix, timeout_s=0.5), TTL_S))
    with RouterThread(addresses, membership=membership) as router:
        wait_for(lambda: len(instance_keys(redis_server, prefix)) == 3, "3 instances registered")
        yield router, addresses, redis_server, prefix
    redis_server.resume()  # in case a test failed while Redis was paused


def instance_keys(server: RedisServer, prefix: str) -> list[bytes]:
    client = redis.Redis.from_url(server.url, socket_timeout=1)
    try:
        return sorted(client.keys(f"{prefix}instance:*"))
    finally:
        client.close()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for: {what}")
        time.sleep(0.1)


def store_summary(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/status", timeout=30).json()["store"])


def in_background(url: str) -> tuple[threading.Thread, dict[str, Any]]:
    """Greedy completions of PROMPTS, sent concurrently on a thread: the load."""
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.update(ids=greedy_token_ids(url, PROMPTS, MAX_TOKENS))
    )
    thread.start()
    return thread, result


@pytest.fixture(scope="module")
def expected(workers) -> list[list[int]]:
    _, addresses = workers
    with RouterThread(addresses) as router:
        return greedy_token_ids(router.url, PROMPTS, MAX_TOKENS)


def test_a_flushed_redis_gets_every_instance_back_with_its_next_heartbeat(cluster, expected):
    router, addresses, server, prefix = cluster
    load, result = in_background(router.url)
    server.command("FLUSHALL")
    assert instance_keys(server, prefix) == []
    wait_for(lambda: len(instance_keys(server, prefix)) == 3, "3 instances registered again")
    load.join()
    assert result["ids"] == expected
    assert store_summary(router.url)["registry"]["num_reregistered"] == 3
    wait_all_free(addresses)


def test_a_hung_then_stopped_redis_holds_no_request_and_shows_in_ready_and_metrics(
    cluster, expected
):
    router, addresses, server, prefix = cluster
    server.pause()  # connections open, nothing answers
    started = time.monotonic()
    load, result = in_background(router.url)
    load.join(120)
    assert result["ids"] == expected
    wait_for(lambda: not store_summary(router.url)["healthy"], "the store marked unhealthy")
    ready = httpx.get(f"{router.url}/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["store"]["healthy"] is False
    assert "tandem:store_up{" in (metrics := httpx.get(f"{router.url}/metrics").text)
    assert _sample(metrics, "tandem:store_up") == 0.0
    assert time.monotonic() - started < 60
    server.resume()
    wait_for(lambda: store_summary(router.url)["healthy"], "the store healthy again")

    server.stop()  # connections refused
    load, result = in_background(router.url)
    load.join(120)
    assert result["ids"] == expected
    server.start_again()  # empty: the instances register again
    wait_for(lambda: len(instance_keys(server, prefix)) == 3, "3 instances registered again")
    assert httpx.get(f"{router.url}/ready", timeout=10).json()["store"]["healthy"] is True
    wait_all_free(addresses)


def test_an_instance_unlike_its_pool_is_refused_and_the_rest_serve(workers, redis_server):
    _, addresses = workers
    launcher = LocalLauncher()
    spec = WorkerSpec(
        "decode-bf16",
        "decode",
        store_address=workers[0].store_address,
        dtype="bfloat16",
        max_num_batched_tokens=256,
    )
    (odd,) = launcher.start([spec])
    try:
        prefix = f"tandem-test:{uuid.uuid4().hex[:8]}:"
        registry = Registry(RedisStore(redis_server.url, prefix, timeout_s=0.5), TTL_S)
        with RouterThread([*addresses, odd.address], membership=Membership(registry)) as router:
            listed = httpx.get(f"{router.url}/admin/instances", timeout=10).json()["instances"]
            assert sorted(i["instance_id"] for i in listed) == ["decode-0", "decode-1", "prefill-0"]
            store = store_summary(router.url)
            assert store["registry"]["num_refused"] == 1
            assert "its dtype is 'bfloat16'" in store["refused"]["decode-bf16"]
            metrics = httpx.get(f"{router.url}/metrics").text
            assert _sample(metrics, 'tandem:registry_events_total{event="refused"') == 1.0
            assert len(greedy_token_ids(router.url, PROMPTS[:2], 8)[0]) == 8
    finally:
        launcher.shutdown()
    wait_all_free(addresses)


def test_a_worker_that_stops_answering_leaves_routing_and_comes_back(workers, cluster, expected):
    router, addresses, server, prefix = cluster
    deployment, _ = workers
    (stuck,) = [w for w in deployment.workers if w.spec.instance_id == "decode-1"]
    os.kill(stuck.process.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: not _healthy(router.url)["decode-1"], "decode-1 expired", timeout=30)
        # its record goes; the others', heartbeated all along, stay
        wait_for(lambda: len(instance_keys(server, prefix)) == 2, "decode-1's record removed", 5)
        assert {k.decode().rsplit(":", 1)[1] for k in instance_keys(server, prefix)} == {
            "prefill-0",
            "decode-0",
        }
        assert greedy_token_ids(router.url, PROMPTS, MAX_TOKENS) == expected  # on decode-0
    finally:
        os.kill(stuck.process.pid, signal.SIGCONT)
    wait_for(lambda: _healthy(router.url)["decode-1"], "decode-1 back in routing")
    assert store_summary(router.url)["registry"]["num_expired"] == 1
    wait_for(lambda: len(instance_keys(server, prefix)) == 3, "decode-1 registered again")
    wait_all_free(addresses)


def _healthy(url: str) -> dict[str, bool]:
    listed = httpx.get(f"{url}/admin/instances", timeout=10).json()["instances"]
    return {i["instance_id"]: i["healthy"] for i in listed}


def _sample(metrics: str, prefix: str) -> float:
    (line,) = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(line.rsplit(" ", 1)[1])
