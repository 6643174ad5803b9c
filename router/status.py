"""What the router reports about itself and its workers (GET /status), and asks of
them (Status, polled for load and metrics).

The handoff log keeps, for every disaggregated request, how many bytes of KV cache
its prefill instance sent to its decode instance and how long that took (from the
prefill instance's HandoffDone), as totals and as the latest records.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import grpc
from google.protobuf.message import Message

from proto.tandem.internal.v1 import worker_pb2
from router.config import RouterConfig
from router.instances import Instance, rpc_reason
from router.load import InstanceLoad, LoadTracker
from router.membership import Membership
from router.metrics import RouterMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandoffRecord:
    request_id: str
    prefill_id: str
    decode_id: str
    kv_bytes: int
    seconds: float


class HandoffLog:
    def __init__(self, max_records: int = 1024) -> None:
        self._records: collections.deque[HandoffRecord] = collections.deque(maxlen=max_records)
        self.num_handoffs = 0
        self.kv_bytes = 0
        self.seconds = 0.0

    def add(self, record: HandoffRecord) -> None:
        self._records.append(record)
        self.num_handoffs += 1
        self.kv_bytes += record.kv_bytes
        self.seconds += record.seconds

    def recent(self) -> list[HandoffRecord]:
        """The latest records, oldest first."""
        return list(self._records)

    def summary(self, num_recent: int = 10) -> dict[str, Any]:
        n = self.num_handoffs
        return {
            "num_handoffs": n,
            "kv_bytes_total": self.kv_bytes,
            "seconds_total": self.seconds,
            "kv_bytes_per_request": self.kv_bytes / n if n else 0.0,
            "seconds_per_request": self.seconds / n if n else 0.0,
            "recent": [asdict(r) for r in self.recent()[-num_recent:]],
        }


def message_to_dict(message: Message) -> dict[str, Any]:
    """Every field of a proto message, set or not, with 64-bit integers kept as numbers
    (json_format writes them as strings)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None:
            out[field.name] = (
                [message_to_dict(v) for v in value] if field.is_repeated else message_to_dict(value)
            )
        else:
            out[field.name] = list(value) if field.is_repeated else value
    return out


async def instance_status(
    instance: Instance, request: worker_pb2.StatusRequest, timeout_s: float
) -> dict[str, Any]:
    """One worker's Status as JSON, with how the router sees it (address, role,
    healthy); `reachable` False and the error if it did not answer."""
    entry: dict[str, Any] = {
        "address": instance.address,
        "instance_id": instance.instance_id,
        "role": instance.role.value,
        "healthy": instance.healthy,
    }
    try:
        status = await instance.stub.Status(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        return {**entry, "reachable": False, "error": rpc_reason(e)}
    reported = message_to_dict(status)
    reported.pop("step_samples", None)  # up to 256 per worker: for the policies
    return {**reported, **entry, "reachable": True}


async def poll_status(
    instance: Instance,
    request: worker_pb2.StatusRequest,
    timeout_s: float,
    loads: LoadTracker,
    metrics: RouterMetrics,
) -> InstanceLoad | None:
    """Asks a worker for its Status: its load for the routing policies, its gauges for
    the metrics; None if it does not answer. Such a worker is left out of the metrics,
    and its load goes stale (LoadTracker.max_age_s)."""
    sent = time.monotonic()
    try:
        status = await instance.stub.Status(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        logger.debug("Status of %s: %s", instance, rpc_reason(e))
        metrics.forget_instance(instance.instance_id)
        return None
    try:
        load = loads.update(instance.instance_id, status, sent)
    except ValueError as e:
        logger.warning("Status of %s: %s", instance, e)
        return None
    metrics.observe_instance(
        instance.instance_id,
        instance.role.value,
        status.num_running,
        status.num_waiting,
        1 - status.num_free_blocks / status.num_blocks if status.num_blocks else 0.0,
        status.prefix_cache_queries,
        status.prefix_cache_hits,
    )
    return load


def instances_summary(
    instances: Iterable[Instance], routed: Mapping[str, int], loads: LoadTracker
) -> list[dict[str, Any]]:
    """Each worker as the admin API shows it: role, address, health, draining, the
    requests routed to it and its last load (None when unknown or stale)."""
    now = time.monotonic()
    summary = []
    for instance in instances:
        load = loads.current(instance.instance_id, now)
        summary.append(
            {
                "instance_id": instance.instance_id,
                "role": instance.role.value,
                "address": instance.address,
                "tensor_parallel": max(1, instance.info.tensor_parallel_size),
                "healthy": instance.healthy,
                "expired": instance.expired,
                "unreachable": instance.unreachable,
                "draining": instance.draining,
                "num_requests": routed.get(instance.instance_id, 0),
                "load": None if load is None else asdict(load),
            }
        )
    return summary


async def workers_status(
    instances: Iterable[Instance], check_invariants: bool, timeout_s: float
) -> list[dict[str, Any]]:
    """Every worker's Status as JSON (instance_status), asked together."""
    request = worker_pb2.StatusRequest(check_invariants=check_invariants)
    return list(await asyncio.gather(*(instance_status(i, request, timeout_s) for i in instances)))


async def poll_loads(
    instances: Mapping[str, Instance],
    config: RouterConfig,
    loads: LoadTracker,
    metrics: RouterMetrics,
    router_queue: Callable[[], tuple[int, int]],
    membership: Membership,
) -> None:
    """Until cancelled, every load_poll_interval_s: each worker's Status, for routing,
    metrics and heartbeats (router.membership), and the router's own queue (in flight,
    waiting) for the metrics.

    Each worker's poll runs on its own: a round waits at most the interval, and a worker
    whose Status has not answered by then counts as silent this round while its call
    goes on. So one hung worker delays nobody else's heartbeat (it expires alone)."""
    request = worker_pb2.StatusRequest()
    in_flight: dict[str, asyncio.Task[InstanceLoad | None]] = {}
    try:
        while True:
            started = time.monotonic()
            polled = list(instances.values())
            for instance in polled:
                if instance.instance_id not in in_flight:
                    in_flight[instance.instance_id] = asyncio.create_task(
                        poll_status(instance, request, config.rpc_timeout_s, loads, metrics)
                    )
            round_tasks = [in_flight[i.instance_id] for i in polled]
            await asyncio.wait(round_tasks, timeout=config.load_poll_interval_s)
            answers: list[InstanceLoad | None] = []
            for instance, task in zip(polled, round_tasks, strict=True):
                if not task.done():
                    answers.append(None)  # silent so far; its call goes on
                    continue
                del in_flight[instance.instance_id]
                answers.append(task.result())
                if answers[-1] is not None:
                    instance.unreachable = False
            for instance_id in in_flight.keys() - instances.keys():  # removed meanwhile
                in_flight.pop(instance_id).cancel()
            await membership.after_poll(zip(polled, answers))
            metrics.set_router_queue(*router_queue())
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, config.load_poll_interval_s - elapsed))
    finally:
        for task in in_flight.values():
            task.cancel()
