"""The instance registry: registration, capability checks, heartbeats, expiry, and what
it does when Redis is flushed, killed or hung.

The logic tests run on the in-process store with a fake clock; the fault tests on a
Redis of their own, with short ttls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from cluster.registry import (
    Capabilities,
    CapabilityMismatch,
    InstanceRecord,
    NotRegistered,
    Registry,
    RegistryChange,
)
from cluster.store import MemoryStore, RedisStore, StoreUnavailable
from tests.cluster.conftest import FakeClock
from tests.cluster.redis_server import RedisServer

pytestmark = pytest.mark.anyio

CAPS = Capabilities(model_hash="sha256:abc", dtype="bfloat16", block_size=16)
TTL_S = 3.0
TIMEOUT_S = 0.5
MAX_CALL_S = 3 * TIMEOUT_S  # the slack is for a loaded machine


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> Registry:
    return Registry(MemoryStore(clock), ttl_s=TTL_S, clock=clock)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    server = RedisServer.start()
    yield server
    server.close()


def instance(instance_id: str, role: str = "decode", **caps: Any) -> InstanceRecord:
    return InstanceRecord(instance_id, role, f"{instance_id}:50051", replace(CAPS, **caps))


def ids(records: list[InstanceRecord]) -> list[str]:
    return [r.instance_id for r in records]


def test_a_record_survives_json_and_its_role_is_checked() -> None:
    record = replace(instance("d0"), load={"num_running": 3.0}, registered_at=5.0)
    assert InstanceRecord.from_json(record.to_json()) == record
    with pytest.raises(ValueError, match="role must be one of"):
        instance("x", role="encoder")


async def test_registered_instances_are_live_with_the_load_of_their_last_heartbeat(
    registry: Registry, clock: FakeClock
) -> None:
    await registry.register(instance("d1"))
    await registry.register(instance("p0", role="prefill", tensor_parallel=2))
    clock.now += 1
    beat = await registry.heartbeat("d1", {"num_running": 4.0, "kv_usage": 0.5})
    assert (beat.registered_at, beat.last_heartbeat) == (1000.0, 1001.0)
    live = await registry.live()
    assert ids(live) == ["d1", "p0"]
    assert live[0].load == {"num_running": 4.0, "kv_usage": 0.5}
    assert live[1].capabilities.tensor_parallel == 2
    assert registry.counters.num_registered == 2 and not registry.degraded


@pytest.mark.parametrize(
    ("field", "value"), [("dtype", "float16"), ("block_size", 32), ("tensor_parallel", 2)]
)
async def test_an_instance_unlike_its_pool_is_refused_naming_the_field(
    registry: Registry, field: str, value: Any
) -> None:
    await registry.register(instance("d1"))
    with pytest.raises(CapabilityMismatch, match=f"its {field} is {value!r}") as refused:
        await registry.register(instance("d2", **{field: value}))
    assert refused.value.fields == [field]
    assert "'d2' cannot join the decode pool" in str(refused.value)
    assert registry.counters.num_refused == 1
    assert ids(await registry.live()) == ["d1"]


async def test_the_kv_cache_must_match_across_pools_but_parallelism_only_within_one(
    registry: Registry,
) -> None:
    await registry.register(instance("d1"))
    await registry.register(instance("p1", role="prefill", tensor_parallel=4))
    with pytest.raises(CapabilityMismatch, match="the decode pool's is 16") as refused:
        await registry.register(instance("p2", role="prefill", tensor_parallel=4, block_size=8))
    assert refused.value.fields == ["block_size"]
    assert ids(await registry.live()) == ["d1", "p1"]


async def test_expected_capabilities_refuse_even_the_first_instance(registry: Registry) -> None:
    registry.expect("decode", replace(CAPS, model_hash="sha256:other"))
    with pytest.raises(CapabilityMismatch, match="model_hash"):
        await registry.register(instance("d1"))
    assert await registry.live() == []
    with pytest.raises(NotRegistered, match="call register"):
        await registry.heartbeat("d1", {})


async def test_a_missed_heartbeat_expires_the_instance_once(
    registry: Registry, clock: FakeClock
) -> None:
    await registry.register(instance("d1"))
    await registry.register(instance("d2"))
    assert ids((await registry.refresh()).added) == ["d1", "d2"]
    clock.now += TTL_S / 2
    await registry.heartbeat("d1", {})
    clock.now += TTL_S / 2  # d2's ttl has passed; d1 heartbeat halfway through its own
    assert await registry.refresh() == RegistryChange([], ["d2"])
    assert ids(await registry.live()) == ["d1"]
    assert await registry.refresh() == RegistryChange([], [])
    assert registry.counters.num_expired == 1


async def test_a_pool_whose_instances_all_expired_can_be_fixed_anew(
    registry: Registry, clock: FakeClock
) -> None:
    await registry.register(instance("d1"))
    clock.now += TTL_S
    await registry.register(instance("d2", dtype="float16"))
    assert ids(await registry.live()) == ["d2"]
    assert registry.counters.num_refused == 0


async def test_forget_removes_an_instance_at_once_and_stops_its_heartbeats(
    registry: Registry,
) -> None:
    await registry.register(instance("d1"))
    await registry.refresh()
    await registry.forget("d1")
    assert await registry.live() == []
    assert await registry.refresh() == RegistryChange([], [])  # not an expiry here
    with pytest.raises(NotRegistered):
        await registry.heartbeat("d1", {})


async def test_an_unreadable_record_is_skipped(registry: Registry) -> None:
    await registry.register(instance("d1"))
    await registry.store.put("instance:junk", b"{not json", ttl_s=TTL_S)
    await registry.store.put("instance:old", '{"instance_id": "old"}', ttl_s=TTL_S)
    assert ids(await registry.live()) == ["d1"]


async def test_after_a_redis_flush_the_next_heartbeat_registers_again_once(
    server: RedisServer,
) -> None:
    registry = Registry(RedisStore(server.url, "tandem-test:", TIMEOUT_S), ttl_s=TTL_S)
    await registry.register(instance("d1"))
    assert server.command("FLUSHALL") == b"+OK\r\n"
    assert await registry.live() == []
    await registry.heartbeat("d1", {"num_running": 1.0})
    await registry.heartbeat("d1", {"num_running": 2.0})
    live = await registry.live()
    assert ids(live) == ["d1"] and live[0].load == {"num_running": 2.0}
    assert registry.counters.num_reregistered == 1
    assert registry.counters.num_registered == 1
    # The pool was fixed again too: an unlike instance is still refused.
    with pytest.raises(CapabilityMismatch, match="dtype"):
        await registry.register(instance("d2", dtype="float32"))
    await registry.store.close()


async def test_on_redis_a_missed_heartbeat_expires_the_instance(server: RedisServer) -> None:
    store = RedisStore(server.url, "tandem-test:", TIMEOUT_S)
    router, worker = Registry(store, ttl_s=1.0), Registry(store, ttl_s=1.0)
    await worker.register(instance("d1"))
    await worker.register(instance("d2"))
    assert ids((await router.refresh()).added) == ["d1", "d2"]
    for _ in range(4):
        await asyncio.sleep(0.4)
        await worker.heartbeat("d1", {})
    assert await router.refresh() == RegistryChange([], ["d2"])
    assert ids(await router.live()) == ["d1"]
    assert router.counters.num_expired == 1
    await store.close()


async def test_while_redis_is_down_routing_goes_on_from_the_cache(server: RedisServer) -> None:
    registry = Registry(RedisStore(server.url, "tandem-test:", TIMEOUT_S), ttl_s=TTL_S)
    await registry.register(instance("d1"))
    await registry.refresh()
    server.stop()
    start = time.monotonic()
    assert ids(await registry.live()) == ["d1"]
    assert await registry.refresh() == RegistryChange([], [])
    assert time.monotonic() - start < MAX_CALL_S
    assert registry.degraded and not registry.store.health.healthy
    with pytest.raises(StoreUnavailable):
        await registry.heartbeat("d1", {"num_running": 5.0})

    server.start_again()  # empty: the next heartbeat brings the record back
    await registry.heartbeat("d1", {"num_running": 6.0})
    assert ids(await registry.live()) == ["d1"] and not registry.degraded
    assert registry.counters.num_reregistered == 1
    await registry.store.close()


async def test_a_hung_redis_cannot_hold_the_registry_past_the_timeout(
    server: RedisServer,
) -> None:
    registry = Registry(RedisStore(server.url, "tandem-test:", TIMEOUT_S), ttl_s=TTL_S)
    await registry.register(instance("d1"))
    await registry.live()
    server.pause()
    try:
        start = time.monotonic()
        assert ids(await registry.live()) == ["d1"]
        assert time.monotonic() - start < MAX_CALL_S
        assert registry.degraded
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await registry.heartbeat("d1", {})
        assert time.monotonic() - start < MAX_CALL_S
    finally:
        server.resume()
    assert ids(await registry.live()) == ["d1"] and not registry.degraded
    assert registry.store.health.healthy
    await registry.store.close()


async def test_two_processes_sharing_redis_refuse_an_unlike_instance(
    server: RedisServer,
) -> None:
    store_a = RedisStore(server.url, "tandem-test:", TIMEOUT_S)
    store_b = RedisStore(server.url, "tandem-test:", TIMEOUT_S)
    a, b = Registry(store_a, ttl_s=TTL_S), Registry(store_b, ttl_s=TTL_S)
    await a.register(instance("d1"))
    with pytest.raises(CapabilityMismatch, match="its block_size is 32"):
        await b.register(instance("d2", block_size=32))
    assert b.counters.num_refused == 1
    assert ids(await a.live()) == ["d1"] == ids(await b.live())
    await store_a.close()
    await store_b.close()
