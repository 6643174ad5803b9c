"""The instance registry: which instances serve, in which pool, how loaded.

Pure asyncio over a `StateStore` (no gRPC, Ray or torch). Instances register and
heartbeat through their own `Registry`; the router reads the same keys through its own.

    "instance:<instance_id>"  an InstanceRecord as JSON, written with ttl_s
    "pool:<role>"             the pool's Capabilities as JSON, written with ttl_s

An instance's life, as every registry sees it (the caller heartbeats every ttl_s / 3):

    register ──▶ live ──heartbeat: record rewritten with its load, ttl renewed──▶ live
                   │
                   │ no heartbeat for ttl_s: the store drops the record
                   ▼
                expired: refresh() reports it once, the router stops routing to it

    record lost (store flushed, heartbeats missed) ──▶ next heartbeat re-registers it
    capabilities unlike the pool's ──▶ CapabilityMismatch: refused, never live

A pool's capabilities are the ones `expect(role, ...)` gave, else the first registered
instance's; they are renewed by its instances' heartbeats, so a pool whose instances
have all expired can be fixed anew. The KV cache fields (model hash, dtype, block size)
must also match across pools, since prefill hands its blocks to decode; parallelism
need only match within a pool.

If the store stops answering, `live()` answers from the last state it read and sets
`degraded` until a read succeeds again; `refresh()` then reports no change, because a
store outage says nothing about the instances.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from cluster.spec import ROLES
from cluster.store import StateStore, StoreUnavailable

logger = logging.getLogger(__name__)

INSTANCE_PREFIX = "instance:"
POOL_PREFIX = "pool:"
KV_FIELDS = ("model_hash", "dtype", "block_size")  # must match across pools


@dataclass(frozen=True)
class Capabilities:
    """What an instance must share with its pool for requests to move between them."""

    model_hash: str
    dtype: str
    block_size: int
    tensor_parallel: int = 1
    pipeline_parallel: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Capabilities:
        return cls(**data)


@dataclass(frozen=True)
class InstanceRecord:
    instance_id: str
    role: str  # one of cluster.spec.ROLES
    address: str  # host:port of its gRPC service
    capabilities: Capabilities
    load: dict[str, float] = field(default_factory=dict)  # as of its last heartbeat
    registered_at: float = 0.0  # the registry's clock (wall-clock seconds)
    last_heartbeat: float = 0.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> InstanceRecord:
        data = json.loads(text)
        data["capabilities"] = Capabilities.from_dict(data["capabilities"])
        return cls(**data)


@dataclass(frozen=True)
class RegistryChange:
    added: list[InstanceRecord]
    expired_ids: list[str]


@dataclass
class RegistryCounters:
    """Plain counts since the registry started, for the caller to export."""

    num_registered: int = 0
    num_reregistered: int = 0  # records a heartbeat found missing and wrote again
    num_expired: int = 0  # instances refresh() saw vanish
    num_refused: int = 0  # registrations refused with CapabilityMismatch


class RegistryError(Exception):
    pass


class NotRegistered(RegistryError):
    pass


class CapabilityMismatch(RegistryError):
    """An instance whose capabilities differ from its pool's (or, for the KV cache
    fields, another pool's). `fields` names each field that differs."""

    def __init__(
        self, instance_id: str, role: str, differences: list[tuple[str, str, Any, Any]]
    ) -> None:
        self.instance_id = instance_id
        self.role = role
        self.fields = sorted({name for _, name, _, _ in differences})
        details = "; ".join(
            f"its {name} is {got!r} but the {pool} pool's is {expected!r}"
            for pool, name, expected, got in differences
        )
        super().__init__(
            f"instance {instance_id!r} cannot join the {role} pool: {details}. Start it with "
            "the pool's model, dtype, KV block size and parallelism, or give it a cluster "
            "of its own (another store prefix)."
        )


class Registry:
    """One process's view of the instances in the store, and the instances it registered.

    `ttl_s` is how long a record outlives its last heartbeat; `clock` gives the
    timestamps written in records (wall-clock seconds by default)."""

    def __init__(
        self, store: StateStore, ttl_s: float = 10.0, clock: Callable[[], float] = time.time
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"registry ttl must be positive, got {ttl_s} s")
        self.store = store
        self.ttl_s = ttl_s
        self.counters = RegistryCounters()
        self.degraded = False  # the last read of the store failed: live() is the cache
        self._clock = clock
        self._expected: dict[str, Capabilities] = {}  # role -> given by expect()
        self._own: dict[str, InstanceRecord] = {}  # registered here: heartbeats rewrite them
        self._cached: dict[str, InstanceRecord] = {}  # as of the last successful read
        self._routed_ids: set[str] = set()  # live at the last refresh()

    def expect(self, role: str, capabilities: Capabilities) -> None:
        """Fixes `role`'s pool capabilities here, whatever the store says."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self._expected[role] = capabilities

    async def register(self, record: InstanceRecord) -> InstanceRecord:
        """Writes `record` (timestamped now) and heartbeats it from here on. Raises
        CapabilityMismatch if it does not fit its pool, StoreUnavailable on a store outage."""
        now = self._clock()
        record = replace(record, registered_at=now, last_heartbeat=now)
        await self._admit(record)
        await self.store.put(_instance_key(record.instance_id), record.to_json(), self.ttl_s)
        self._own[record.instance_id] = record
        self.counters.num_registered += 1
        return record

    async def heartbeat(self, instance_id: str, load: Mapping[str, float]) -> InstanceRecord:
        """Rewrites the record with `load` and renews its ttl; if the store lost it,
        registers it again. Raises StoreUnavailable on a store outage (call again later),
        CapabilityMismatch if its pool was fixed anew meanwhile with other capabilities."""
        record = self._own.get(instance_id)
        if record is None:
            raise NotRegistered(
                f"instance {instance_id!r} was not registered through this registry; "
                "call register() before heartbeat()"
            )
        record = replace(record, load=dict(load), last_heartbeat=self._clock())
        self._own[instance_id] = record  # the freshest copy, should the store lose it
        key = _instance_key(instance_id)
        if await self.store.replace(key, record.to_json(), self.ttl_s):
            await self.store.put(_pool_key(record.role), _caps_json(record), self.ttl_s)
            return record
        await self._admit(record)
        await self.store.put(key, record.to_json(), self.ttl_s)
        self.counters.num_reregistered += 1
        logger.info("re-registered %s: its record was gone from the store", instance_id)
        return record

    async def live(self) -> list[InstanceRecord]:
        """The registered instances, by id. Never raises on a store outage: it answers
        from the last successful read and sets `degraded`."""
        try:
            items = await self.store.scan(INSTANCE_PREFIX)
        except StoreUnavailable as e:
            if not self.degraded:
                logger.warning("instance registry answers from its cache: %s", e)
            self.degraded = True
            return sorted(self._cached.values(), key=lambda r: r.instance_id)
        self._cached = _parse_records(items)
        self.degraded = False
        return sorted(self._cached.values(), key=lambda r: r.instance_id)

    async def refresh(self) -> RegistryChange:
        """The instances that appeared and vanished since the last refresh(); nothing
        while the store is unavailable."""
        records = await self.live()
        if self.degraded:
            return RegistryChange([], [])
        added = [r for r in records if r.instance_id not in self._routed_ids]
        current_ids = {r.instance_id for r in records}
        expired_ids = sorted(self._routed_ids - current_ids)
        self._routed_ids = current_ids
        self.counters.num_expired += len(expired_ids)
        return RegistryChange(added, expired_ids)

    async def forget(self, instance_id: str) -> None:
        """Removes an instance now rather than at its ttl: one leaving on purpose, or one
        the caller found dead. This registry stops heartbeating it and does not report it
        as expired; other registries do. Raises StoreUnavailable on a store outage, when
        the record goes at its ttl instead."""
        self._own.pop(instance_id, None)
        self._cached.pop(instance_id, None)
        self._routed_ids.discard(instance_id)
        await self.store.delete(_instance_key(instance_id))

    async def _admit(self, record: InstanceRecord) -> None:
        """Raises CapabilityMismatch unless `record` fits every pool; fixes its own pool's
        capabilities if none are."""
        pools = await self._read_pools()
        self._check(record, pools)
        if record.role in pools:
            return
        if not await self.store.add(_pool_key(record.role), _caps_json(record), self.ttl_s):
            self._check(record, await self._read_pools())  # fixed by another meanwhile

    def _check(self, record: InstanceRecord, pools: dict[str, Capabilities]) -> None:
        differences = []
        for role, expected in {**pools, **self._expected}.items():
            names = [f.name for f in fields(Capabilities)] if role == record.role else KV_FIELDS
            for name in names:
                got = getattr(record.capabilities, name)
                if getattr(expected, name) != got:
                    differences.append((role, name, getattr(expected, name), got))
        if differences:
            self.counters.num_refused += 1
            raise CapabilityMismatch(record.instance_id, record.role, differences)

    async def _read_pools(self) -> dict[str, Capabilities]:
        items = await self.store.scan(POOL_PREFIX)
        return {
            key.removeprefix(POOL_PREFIX): Capabilities.from_dict(json.loads(value))
            for key, value in items.items()
        }


def _parse_records(items: dict[str, bytes]) -> dict[str, InstanceRecord]:
    records = {}
    for key, value in items.items():
        try:
            record = InstanceRecord.from_json(value)
        except (ValueError, TypeError, KeyError) as e:  # written by another version?
            logger.warning("skipping unreadable instance record %s: %s", key, e)
            continue
        records[record.instance_id] = record
    return records


def _instance_key(instance_id: str) -> str:
    return INSTANCE_PREFIX + instance_id


def _pool_key(role: str) -> str:
    return POOL_PREFIX + role


def _caps_json(record: InstanceRecord) -> str:
    return json.dumps(record.capabilities.to_dict())
