"""Live migration on the router: who streams a request's tokens, and the admin operations.

A decode instance moves a running request to another one by itself (Worker.Migrate,
decode_worker/migration.py); the router asks for it and follows the request:

    migrate(request, D2) ─▶ request.migrating_to = D2 ─▶ D1.Migrate(request, D2)
        tokens from D1 (the owner) ──────────────────┐
        tokens from D2 (first one: D2 becomes owner) ├─▶ the request's stream, which
        tokens from D1 after that (sent before the   │   puts them in order and drops
        pause, arriving late)                        ┘   positions it has already
    reply committed ─▶ D2 owns it (if no token said so yet); else D1 keeps it

A decode instance that is not the owner is heard only when it carries tokens (or
finishes with "stop" or "length"): a migration's failure at the destination, or its
undoing there, ends nothing. Since the destination continues from the exact tokens
and seed position, both copies agree on every position either of them sends.

run_policy() runs the migration scheduler (cluster.migration_policy) every interval on
a snapshot of the decode instances: KV blocks in use from their last Status, demand
from the requests routed to them still waiting for a first token, and each running
request's blocks from its prompt and the tokens streamed so far.

drain(D) takes D out of routing and migrates its requests away, retrying those that
cannot move yet (still arriving from prefill), until none is left or time is up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from cluster.migration_policy import DecodeInstance, RunningRequest, make_policy
from proto.tandem.internal.v1 import worker_pb2
from router.config import RouterConfig
from router.dispatch import InFlight
from router.errors import InvalidRequestError, NoInstanceError, RouterError, UnknownRequestError
from router.instances import Instance
from router.load import LoadTracker
from router.policy import Role

logger = logging.getLogger(__name__)

_CARRIES_OUTPUT = ("stop", "length")


@dataclass(frozen=True)
class MigrationOutcome:
    request_id: str
    source_id: str
    destination_id: str
    committed: bool
    abort_reason: str  # empty when committed
    detail: str
    stages: int
    kv_bytes: int
    downtime_s: float
    total_s: float
    num_kv_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Migrations:
    def __init__(
        self,
        in_flight: dict[str, InFlight],
        instances: dict[str, Instance],
        routed: dict[str, int],
        loads: LoadTracker,
        on_outcome: Callable[[MigrationOutcome], None],
        timeout_s: float,
    ) -> None:
        self._in_flight = in_flight
        self._instances = instances
        self._routed = routed
        self._loads = loads
        self._on_outcome = on_outcome
        self._timeout_s = timeout_s
        # When each instance last ended a migration (either side), router clock: the
        # scheduler waits for a load reported after it, or it would move the same load
        # twice, back and forth.
        self._settled_at: dict[str, float] = {}

    def choice_ids(self, request_id: str) -> list[str]:
        """The ids in flight of a request the client knows by `request_id`: its first
        choice has that id, the others `{request_id}-{c}`."""
        prefix = f"{request_id}-"
        return [i for i in self._in_flight if i == request_id or i.startswith(prefix)]

    # -- the token streams ------------------------------------------------------------------

    def accepts(self, request: InFlight, instance_id: str, delta: worker_pb2.TokenDelta) -> bool:
        """Whether a delta from `instance_id`, which does not own the request, goes into
        its stream; the migration's destination becomes the owner with its first one."""
        if not delta.token_ids and delta.finish_reason not in _CARRIES_OUTPUT:
            return False
        if instance_id == request.migrating_to:
            self._move(request, instance_id)
            return True
        return instance_id in request.moved_from

    def _move(self, request: InFlight, destination_id: str) -> None:
        source_id = request.route.decode_id
        if source_id == destination_id:
            return
        request.route = dataclasses.replace(request.route, decode_id=destination_id)
        request.moved_from.add(source_id)
        request.moved_from.discard(destination_id)
        self._routed[source_id] -= 1
        self._routed[destination_id] = self._routed.get(destination_id, 0) + 1
        self._loads.on_finish(source_id, request.request_id)  # its prompt is long done

    # -- migrate one request -----------------------------------------------------------------

    async def migrate(
        self, request_id: str, destination_id: str | None = None, blocking: bool = False
    ) -> MigrationOutcome:
        """Moves a request in flight (by its router id) to `destination_id`, or to the
        least busy other decode instance; returns what happened. `blocking` pauses it
        for the whole copy (stop and copy, the baseline live migration improves on)."""
        request = self._in_flight.get(request_id)
        if request is None:
            raise UnknownRequestError(f"no request {request_id!r} is in flight on this router")
        source = self._instances[request.route.decode_id]
        if source.role != Role.DECODE:
            raise InvalidRequestError("requests on colocated instances do not migrate")
        if request.migrating_to is not None:
            raise InvalidRequestError(f"request {request_id!r} is moving already")
        destination = self._destination(source, destination_id)
        request.migrating_to = destination.instance_id
        attempt, worker_id = request.attempt, request.worker_id  # it may be resumed meanwhile
        try:
            reply = await source.stub.Migrate(
                worker_pb2.MigrateRequest(
                    request_id=worker_id, destination=destination.peer(), blocking=blocking
                ),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as e:
            reply = worker_pb2.MigrateReply(
                abort_reason="source_failed", detail=f"{source}: {e.code().name}: {e.details()}"
            )
            # The source may be dead: it cannot undo the reservation it made at the
            # destination, so the router does (unless it was committed there).
            await self._abort_reserved(destination, worker_id, reply.detail)
        finally:
            if request.attempt == attempt:
                request.migrating_to = None
            ended = time.monotonic()
            self._settled_at[source.instance_id] = self._settled_at[destination.instance_id] = ended
        if request.attempt != attempt:
            pass  # resumed elsewhere meanwhile (its source died): the route is new
        elif reply.committed:
            self._move(request, destination.instance_id)
        elif request.route.decode_id == destination.instance_id:  # undone at the destination
            self._move(request, source.instance_id)
        outcome = MigrationOutcome(
            request_id=request_id,
            source_id=source.instance_id,
            destination_id=destination.instance_id,
            committed=reply.committed,
            abort_reason=reply.abort_reason,
            detail=reply.detail,
            stages=reply.stages,
            kv_bytes=reply.kv_bytes,
            downtime_s=reply.downtime_seconds,
            total_s=reply.total_seconds,
            num_kv_tokens=reply.num_kv_tokens,
        )
        self._on_outcome(outcome)
        return outcome

    async def _abort_reserved(self, destination: Instance, request_id: str, why: str) -> None:
        try:
            await destination.stub.Abort(
                worker_pb2.AbortRequest(
                    request_id=request_id,
                    reason=f"its migration failed at the source ({why})",
                    only_reserved=True,
                ),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as e:
            logger.warning(
                "could not undo the reservation of %s at %s: %s",
                request_id,
                destination,
                e.code().name,
            )

    def _destination(self, source: Instance, destination_id: str | None) -> Instance:
        if destination_id is not None:
            destination = self._instances.get(destination_id)
            if destination is None or destination.role != Role.DECODE:
                names = sorted(i for i, d in self._instances.items() if d.role == Role.DECODE)
                raise InvalidRequestError(
                    f"{destination_id!r} is not a decode instance here; choose one of {names}"
                )
            if destination is source:
                raise InvalidRequestError(f"the request runs on {destination_id!r} already")
            return destination
        choices = [
            i
            for i in self._instances.values()
            if i.role == Role.DECODE and i is not source and i.healthy and not i.draining
        ]
        if not choices:
            raise NoInstanceError("no other healthy decode instance can take the request")
        return min(choices, key=lambda i: self._routed.get(i.instance_id, 0))

    # -- the migration scheduler -------------------------------------------------------------

    async def run_policy(self, config: RouterConfig) -> None:
        """Until cancelled: every interval, the policy's moves, carried out together."""
        policy = make_policy(config.migration_policy, config.migration_threshold)
        while True:
            await asyncio.sleep(config.migration_interval_s)
            instances, requests = self.snapshot(time.monotonic())
            moves = policy.plan(instances, requests)
            results = await asyncio.gather(
                *(self.migrate(m.request_id, m.destination_id) for m in moves),
                return_exceptions=True,
            )
            for move, result in zip(moves, results, strict=True):
                if isinstance(result, BaseException) and not isinstance(result, RouterError):
                    logger.error("migration of %s failed: %r", move.request_id, result)

    def snapshot(self, now: float) -> tuple[list[DecodeInstance], list[RunningRequest]]:
        """The decode instances with a known load reported since their last migration
        ended, and the requests decoding on them."""
        instances: dict[str, DecodeInstance] = {}
        for instance in self._instances.values():
            load = self._loads.current(instance.instance_id, now)
            if instance.role != Role.DECODE or not instance.healthy or load is None:
                continue
            if load.updated_at <= self._settled_at.get(instance.instance_id, -1.0):
                continue
            instances[instance.instance_id] = DecodeInstance(
                instance.instance_id,
                load.num_blocks,
                load.num_blocks - load.num_free_blocks,
                draining=instance.draining,
            )
        requests = []
        for request in list(self._in_flight.values()):
            owner = instances.get(request.route.decode_id)
            if owner is None:
                continue
            block_size = self._instances[owner.instance_id].info.layout.block_size
            num_tokens = request.num_prompt_tokens + request.stream.num_released
            num_blocks = -(-num_tokens // block_size)
            if request.waiting:  # not decoding yet: what it will need counts as demand
                instances[owner.instance_id] = dataclasses.replace(
                    owner, num_demand_blocks=owner.num_demand_blocks + num_blocks
                )
            elif request.migrating_to is None:
                requests.append(RunningRequest(request.request_id, owner.instance_id, num_blocks))
        return list(instances.values()), requests

    # -- drain an instance ---------------------------------------------------------------------

    async def drain(self, instance_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """Takes a decode instance out of routing and moves its requests away. Requests
        that cannot move (still arriving from prefill, or no room elsewhere) are retried
        until none is left there or `timeout_s` has passed."""
        instance = self._instances.get(instance_id)
        if instance is None or instance.role != Role.DECODE:
            names = sorted(i for i, d in self._instances.items() if d.role == Role.DECODE)
            raise InvalidRequestError(f"{instance_id!r} is not a decode instance; one of {names}")
        instance.draining = True
        deadline = time.monotonic() + timeout_s
        outcomes: list[MigrationOutcome] = []
        while (left := self._requests_on(instance_id)) and time.monotonic() < deadline:
            moving = [self.migrate(r.request_id) for r in left if r.migrating_to is None]
            for result in await asyncio.gather(*moving, return_exceptions=True):
                if isinstance(result, MigrationOutcome):
                    outcomes.append(result)
                elif not isinstance(result, RouterError):
                    raise result
            if self._requests_on(instance_id):
                await asyncio.sleep(0.2)
        return {
            "instance_id": instance_id,
            "draining": True,
            "migrated": sum(o.committed for o in outcomes),
            "failed_attempts": sum(not o.committed for o in outcomes),
            "left": [r.request_id for r in self._requests_on(instance_id)],
        }

    def _requests_on(self, instance_id: str) -> list[InFlight]:
        return [r for r in list(self._in_flight.values()) if r.route.decode_id == instance_id]
