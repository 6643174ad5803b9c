"""The router's side of the instance registry (cluster.registry): who may be routed to.

The router is the one that knows whether a worker answers, so its Status polls are the
instances' heartbeats:

    connect (Info) ─▶ register(role, address, capabilities)
        refused (capabilities unlike its pool's) ─▶ never routed to, its channel closed
    each Status poll that answers ─▶ heartbeat(load), at most every ttl_s / 3
    no Status answer for ttl_s ─▶ expired: out of routing, its record removed
    answers again ─▶ registered again, back in routing

The store (memory, or Redis shared by every router and `tandem status`) keeps the
records. A store that fails or hangs costs a poll round at most its timeout: routing
goes on from what the router knows, and the loss shows in /ready's body and in the
metrics (tandem:store_up, tandem:store_errors_total). A record the store lost (a Redis
FLUSHALL) comes back with the instance's next heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cluster.registry import (
    Capabilities,
    CapabilityMismatch,
    InstanceRecord,
    NotRegistered,
    Registry,
)
from cluster.store import MemoryStore, StoreUnavailable
from router.instances import Instance
from router.load import InstanceLoad

logger = logging.getLogger(__name__)


def capabilities(instance: Instance) -> Capabilities:
    """What the instance must share with its pool: the KV layout it reads and writes."""
    layout = instance.info.layout
    shape = f"{layout.model_id}|{layout.num_layers}|{layout.num_kv_heads}|{layout.head_dim}"
    shape += f"|{instance.info.vocab_size}"
    model_hash = hashlib.sha256(shape.encode()).hexdigest()[:16]
    return Capabilities(
        model_hash=model_hash,
        dtype=layout.dtype,
        block_size=layout.block_size,
        tensor_parallel=max(1, instance.info.tensor_parallel_size),
    )


class Membership:
    """Registers, heartbeats and expires the router's instances in `registry`."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry or Registry(MemoryStore())
        self.refused: dict[str, str] = {}  # instance id -> why it was refused
        self._last_answer: dict[str, float] = {}  # monotonic time of its last Status answer
        self._last_beat: dict[str, float] = {}

    @property
    def ttl_s(self) -> float:
        return self.registry.ttl_s

    async def admit(self, instances: Sequence[Instance]) -> list[Instance]:
        """The instances that may be routed to; the refused ones are closed. A store that
        does not answer refuses nobody: their records are written on a later heartbeat."""
        admitted = []
        for instance in instances:
            try:
                await self._register(instance)
            except CapabilityMismatch as e:
                logger.error("refused %s: %s", instance, e)
                self.refused[instance.instance_id] = str(e)
                await instance.channel.close()
                continue
            admitted.append(instance)
        return admitted

    async def after_poll(self, polled: Iterable[tuple[Instance, InstanceLoad | None]]) -> None:
        """One round of Status polls: heartbeats for the instances that answered (due ones
        only), expiry for those silent for ttl_s, all within the store's timeout."""
        now = time.monotonic()
        beats = []
        for instance, load in polled:
            instance_id = instance.instance_id
            if load is None:
                silent_since = self._last_answer.setdefault(instance_id, now)
                if not instance.expired and now - silent_since > self.ttl_s:
                    beats.append(self._expire(instance))
                continue
            self._last_answer[instance_id] = now
            if instance.expired or now - self._last_beat.get(instance_id, -1e9) >= self.ttl_s / 3:
                beats.append(self._beat(instance, load, now))
        await asyncio.gather(*beats)

    async def _beat(self, instance: Instance, load: InstanceLoad, now: float) -> None:
        figures = {
            "num_running": float(load.num_running),
            "num_waiting": float(load.num_waiting),
            "kv_usage": load.kv_usage,
        }
        try:
            try:
                await self.registry.heartbeat(instance.instance_id, figures)
            except NotRegistered:  # its registration met a store outage, or it expired
                await self._register(instance)
        except CapabilityMismatch as e:  # its pool was fixed anew with other capabilities
            logger.error("%s no longer fits its pool: %s", instance, e)
            self.refused[instance.instance_id] = str(e)
            instance.expired = True
            return
        except StoreUnavailable:
            pass  # shown by the store's health; the instance answers, so routing goes on
        else:
            self._last_beat[instance.instance_id] = now
        if instance.expired:
            logger.info("%s answers again: back in routing", instance)
            instance.expired = False

    async def _register(self, instance: Instance) -> None:
        record = InstanceRecord(
            instance_id=instance.instance_id,
            role=instance.role.value,
            address=instance.address,
            capabilities=capabilities(instance),
        )
        with contextlib.suppress(StoreUnavailable):  # written by a later heartbeat
            await self.registry.register(record)

    async def _expire(self, instance: Instance) -> None:
        logger.warning("%s missed its heartbeats for %.1f s: out of routing", instance, self.ttl_s)
        instance.expired = True
        self.registry.counters.num_expired += 1
        with contextlib.suppress(StoreUnavailable):  # then the record goes at its ttl
            await self.registry.forget(instance.instance_id)

    async def close(self) -> None:
        await self.registry.store.close()

    def summary(self) -> dict[str, Any]:
        """The store's health and the registry's counters, for /ready and the admin API."""
        health = self.registry.store.health
        return {
            "kind": type(self.registry.store).__name__,
            "healthy": health.healthy,
            "num_errors": health.num_errors,
            "last_error": health.last_error,
            "registry": asdict(self.registry.counters),
            "refused": dict(self.refused),
        }

    def collect(self) -> Iterator[Metric]:
        """Prometheus families, read at each scrape."""
        health = self.registry.store.health
        yield GaugeMetricFamily(
            "tandem:store_up", "1 while the state store answers, else 0.", int(health.healthy)
        )
        yield CounterMetricFamily(
            "tandem:store_errors", "State store calls that failed or timed out.", health.num_errors
        )
        events = CounterMetricFamily(
            "tandem:registry_events", "Instance registry events, by kind.", labels=["event"]
        )
        for event, count in asdict(self.registry.counters).items():
            events.add_metric([event.removeprefix("num_")], count)
        yield events
