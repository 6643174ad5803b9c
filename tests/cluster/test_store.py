"""The state store's contract, in process and on Redis, and what a failing Redis does to it.

The contract tests use the shared Redis at 127.0.0.1:6379 under a private key prefix,
and delete their keys afterwards. The fault tests start a Redis of their own, then
kill it, pause it (SIGSTOP: it accepts connections and never answers) or cut its
connections.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest

from cluster.store import MemoryStore, RedisStore, StateStore, StoreUnavailable, make_store
from tests.cluster.conftest import FakeClock
from tests.cluster.redis_server import RedisServer

pytestmark = pytest.mark.anyio

SHARED_REDIS = "redis://127.0.0.1:6379/0"
TIMEOUT_S = 0.5
# Fault calls must end within the timeout; the slack is for a loaded machine.
MAX_CALL_S = 3 * TIMEOUT_S


@dataclass
class Case:
    store: StateStore
    wait: Callable[[float], Awaitable[None]]  # lets `seconds` pass for the store's ttls


@pytest.fixture(params=["memory", "redis"])
async def case(request: pytest.FixtureRequest) -> AsyncIterator[Case]:
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.now += seconds

        yield Case(MemoryStore(clock), advance)
        return
    store = await shared_redis_store()
    try:
        yield Case(store, asyncio.sleep)
    finally:
        await delete_all(store)
        await store.close()


async def shared_redis_store() -> RedisStore:
    store = RedisStore(SHARED_REDIS, f"tandem-test:{uuid.uuid4().hex}:", timeout_s=2.0)
    try:
        await store.ping()
    except StoreUnavailable:
        await store.close()
        pytest.skip(f"no Redis at {SHARED_REDIS}; start redis-server to run these tests")
    return store


async def delete_all(store: StateStore) -> None:
    for key in await store.scan(""):
        await store.delete(key)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    server = RedisServer.start()
    yield server
    server.close()


async def test_put_get_delete_round_trip(case: Case) -> None:
    store = case.store
    await store.put("a", b"\x00\xffbytes")
    await store.put("b", "text, é")
    assert await store.get("a") == b"\x00\xffbytes"
    assert await store.get("b") == "text, é".encode()
    assert await store.get("missing") is None
    await store.delete("a")
    await store.delete("missing")  # not an error
    assert await store.get("a") is None
    assert await store.scan("") == {"b": "text, é".encode()}


async def test_a_key_vanishes_when_its_ttl_passes_unless_written_again(case: Case) -> None:
    store = case.store
    await store.put("short", "1", ttl_s=0.3)
    await store.put("renewed", "1", ttl_s=0.3)
    await store.put("forever", "1")
    await case.wait(0.2)
    await store.put("renewed", "2", ttl_s=0.3)
    await case.wait(0.2)
    assert await store.get("short") is None
    assert await store.scan("") == {"renewed": b"2", "forever": b"1"}
    await case.wait(0.2)
    assert await store.scan("") == {"forever": b"1"}


async def test_add_writes_only_an_absent_key_and_replace_only_a_present_one(case: Case) -> None:
    store = case.store
    assert await store.replace("k", "v0") is False
    assert await store.get("k") is None
    assert await store.add("k", "v1") is True
    assert await store.add("k", "v2") is False
    assert await store.get("k") == b"v1"
    assert await store.replace("k", "v3", ttl_s=0.3) is True
    assert await store.get("k") == b"v3"
    await case.wait(0.5)
    assert await store.add("k", "v4") is True  # the expired key counts as absent


async def test_scan_returns_the_keys_under_a_prefix_taken_literally(case: Case) -> None:
    store = case.store
    await store.put("pool:decode", "d")
    await store.put("pool:prefill", "p")
    await store.put("instance:x", "x")
    await store.put("odd*[?]:1", "glob characters")
    await store.put("oddity:1", "a glob would match this")
    assert await store.scan("pool:") == {"pool:decode": b"d", "pool:prefill": b"p"}
    assert await store.scan("odd*[?]") == {"odd*[?]:1": b"glob characters"}
    assert await store.scan("nothing:") == {}


async def test_a_ttl_must_be_positive(case: Case) -> None:
    with pytest.raises(ValueError, match="ttl must be positive"):
        await case.store.put("k", "v", ttl_s=0)
    assert await case.store.get("k") is None


async def test_every_successful_call_keeps_the_store_healthy(case: Case) -> None:
    before = time.time()
    await case.store.ping()
    health = case.store.health
    assert health.healthy and health.num_errors == 0 and health.last_error == ""
    assert health.last_ok_at is not None and health.last_ok_at >= before


async def test_stores_with_other_prefixes_do_not_see_each_others_keys() -> None:
    one, two = await shared_redis_store(), await shared_redis_store()
    try:
        await one.put("k", "one")
        assert await two.get("k") is None
        assert await two.scan("") == {}
        assert await one.scan("") == {"k": b"one"}
    finally:
        await delete_all(one)
        await one.close()
        await two.close()


def test_make_store_by_name() -> None:
    assert isinstance(make_store("memory"), MemoryStore)
    store = make_store("redis", "redis://127.0.0.1:1/0", "tandem:c:", timeout_s=0.25)
    assert isinstance(store, RedisStore)
    assert (store.prefix, store.timeout_s) == ("tandem:c:", 0.25)
    with pytest.raises(ValueError, match="unknown state store 'etcd'"):
        make_store("etcd")


async def timed(call: Awaitable[object]) -> tuple[BaseException | None, float]:
    """The exception `call` raised (or None), and how long it took."""
    start = time.monotonic()
    try:
        await call
    except Exception as e:
        return e, time.monotonic() - start
    return None, time.monotonic() - start


async def test_a_killed_redis_fails_every_call_fast_and_shows_until_it_is_back(
    server: RedisServer,
) -> None:
    store = RedisStore(server.url, "tandem-test:", timeout_s=TIMEOUT_S)
    await store.put("k", "v")
    server.stop()
    for call in (store.get("k"), store.put("k", "w"), store.scan(""), store.ping()):
        error, elapsed = await timed(call)
        assert isinstance(error, StoreUnavailable), error
        assert elapsed < MAX_CALL_S
    assert server.url in str(error) and "redis-server is running" in str(error)
    assert not store.health.healthy
    assert store.health.num_errors == 4
    assert "127.0.0.1" in store.health.last_error

    server.start_again()  # empty: nothing is persisted
    assert await store.get("k") is None
    assert store.health.healthy and store.health.num_errors == 4
    await store.close()


async def test_a_hung_redis_cannot_hold_a_call_past_its_timeout(server: RedisServer) -> None:
    store = RedisStore(server.url, "tandem-test:", timeout_s=TIMEOUT_S)
    await store.put("k", "v")
    server.pause()
    try:
        calls = [store.get("k"), store.add("n", "v"), store.scan(""), store.ping()]
        results = await asyncio.gather(*(timed(call) for call in calls))
        for error, elapsed in results:
            assert isinstance(error, StoreUnavailable), error
            assert elapsed < MAX_CALL_S
        assert not store.health.healthy and store.health.num_errors == 4
    finally:
        server.resume()
    assert await store.get("k") == b"v"
    assert store.health.healthy
    await store.close()


async def test_a_redis_that_closes_its_connections_costs_no_call(server: RedisServer) -> None:
    store = RedisStore(server.url, "tandem-test:", timeout_s=TIMEOUT_S)
    await store.put("k", "v")
    assert server.command("CLIENT", "KILL", "TYPE", "normal").startswith(b":")
    assert await store.get("k") == b"v"  # retried once on a fresh connection
    assert store.health.healthy and store.health.num_errors == 0
    await store.close()
