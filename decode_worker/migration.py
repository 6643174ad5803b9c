"""Live migration of one decoding request to another decode instance: the source's side.

The request keeps generating at the source while its KV is copied in stages; it
pauses only for the last few blocks and its tokens:

    CONNECTING ─▶ RESERVING ─▶ COPYING ─┬─▶ PAUSED ─▶ COMMITTING ─▶ COMMITTED
                                 ▲       │
                                 └───────┘ blocks filled meanwhile, up to max_stages
    any state before COMMITTED ─▶ ABORTED(reason)

    CONNECTING  the KV link to the destination (D), made if need be
    RESERVING   D.Reserve: blocks for the context so far, plus headroom
    COPYING     the full blocks not yet sent, read while the request runs (a full block
                is never written again); repeated for the blocks filled meanwhile
    PAUSED      the request leaves the source's batch (HELD, blocks kept); the rest of
                its blocks and its tokens go out (D.Reserve again if it outgrew them)
    COMMITTING  D.Commit: the request joins D's batch and decodes from the next step
    COMMITTED   the source releases its copy; the router's stream goes on from D

Rollback: the destination frees what it reserved (Abort, or its lease if it cannot
be reached) and the source keeps the request, resuming it if it was paused. If the
request ended meanwhile (it finished, or its client aborted) nothing resumes. A
commit whose answer is lost is undone at D before the source resumes, so the
request never runs in two places; if D cannot be reached even for that, it is taken
for dead. Seeded sampling depends on (seed, position) only, and the tokens go with
the request, so D generates exactly what the source would have.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from cluster.worker_base import layout_message, send_blocks
from engine.errors import MigrationError
from engine.kv.link import LinkError
from proto.convert import params_from_dict
from proto.tandem.internal.v1 import worker_pb2 as pb

logger = logging.getLogger(__name__)


class MigrationState(enum.Enum):
    CONNECTING = "connecting"
    RESERVING = "reserving"
    COPYING = "copying"
    PAUSED = "paused"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ABORTED = "aborted"


@dataclass
class MigrationLimits:
    stage_deadline: float = 10.0  # seconds for each stage: reserve, one copy, commit
    max_stages: int = 4  # copies made while the request runs, before it pauses
    final_blocks: int = 2  # pause as soon as no more than this many blocks are left
    headroom_tokens: int = 64  # reserved beyond the context, for the tokens it adds
    lease: float = 60.0  # D frees the reservation if the source goes silent this long
    blocking: bool = False  # stop and copy: pause first, copy everything while paused


class Abort(Exception):
    """Ends a migration: `reason` is one of MigrateReply.abort_reason's words."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Migration:
    """One request's migration, run to its end by `run()` on the calling thread.

    `call(fn, *args)` runs fn on the source engine's thread; `engine` is read there,
    except read_blocks, which is safe off it."""

    def __init__(
        self,
        request_id: str,
        router_id: str,
        destination: pb.Peer,
        service: Any,  # the source's DecodeService: engine, loop, stub(), connect_link()
        limits: MigrationLimits,
    ) -> None:
        self.request_id = request_id
        self.router_id = router_id
        self.destination = destination
        self.limits = limits
        self.state = MigrationState.CONNECTING
        self._service = service
        self._engine = service.engine
        self._call: Callable[..., Any] = service.loop.call
        self._stub = service.stub(destination.address)
        self._link: Any = None
        self._preemptions = 0  # the request's count when the migration began
        self._reserved_tokens = 0
        self._copied = 0  # leading blocks already at D
        self._stage_started = 0.0
        self.stages = 0
        self.kv_bytes = 0
        self.num_kv_tokens = 0
        self.downtime_s = 0.0

    def run(self) -> pb.MigrateReply:
        started = time.perf_counter()
        try:
            self._migrate()
        except Abort as abort:
            self._roll_back(abort)
            return self._reply(started, abort.reason, str(abort))
        return self._reply(started, "", "")

    # -- the stages ------------------------------------------------------------------------

    def _migrate(self) -> None:
        request, blocks = self._call(self._start)
        self._enter(MigrationState.CONNECTING)
        try:
            self._link = self._service.connect_link(self.destination)
        except LinkError as exc:
            raise Abort(
                "link_failed", f"no KV link to {self.destination.instance_id}: {exc}"
            ) from exc
        self._enter(MigrationState.RESERVING)
        self._reserve(request, request.num_computed_tokens + self.limits.headroom_tokens)
        while not self.limits.blocking:  # copy what is full while the request runs
            self._enter(MigrationState.COPYING)
            self._send(blocks[self._copied :], running=True)
            blocks = self._full_blocks()
            left = len(blocks) - self._copied
            if left <= self.limits.final_blocks or self.stages >= self.limits.max_stages:
                break
        self._enter(MigrationState.PAUSED)
        try:
            block_ids, output_ids, num_kv_tokens = self._call(self._engine.pause, self.request_id)
        except MigrationError as exc:
            raise Abort("finished", str(exc)) from exc
        paused = time.perf_counter()  # it was in the step that ran while pause() waited
        self.num_kv_tokens = num_kv_tokens
        if num_kv_tokens > self._reserved_tokens:
            self._reserve(request, num_kv_tokens)
        self._send(block_ids[self._copied :], running=False)
        self._enter(MigrationState.COMMITTING)
        self._rpc(
            "destination_failed",
            self._stub.Commit,
            pb.CommitRequest(
                request_id=self.request_id,
                output_token_ids=output_ids,
                num_kv_tokens=num_kv_tokens,
            ),
        )
        self.downtime_s = time.perf_counter() - paused
        self.state = MigrationState.COMMITTED
        if not self._call(self._service.moved_away, self.request_id):
            # Its client aborted while it was paused: D must not run it either.
            self._abort_at_destination("the request was aborted during its migration")

    def _start(self) -> tuple[Any, list[int]]:
        """On the engine's thread: the request and its full blocks."""
        try:
            blocks, self._preemptions = self._engine.full_blocks(self.request_id)
        except MigrationError as exc:
            raise _not_decoding(exc) from exc
        return self._engine.requests[self.request_id], blocks

    def _full_blocks(self) -> list[int]:
        """The request's full blocks now; Abort if it ended, stopped decoding, or was
        preempted since the migration began (the blocks copied may hold other KV)."""
        try:
            blocks, preemptions = self._call(self._engine.full_blocks, self.request_id)
        except MigrationError as exc:
            raise _not_decoding(exc) from exc
        if preemptions != self._preemptions:
            raise Abort("not_decoding", "the request was preempted at the source")
        return blocks

    def _reserve(self, request: Any, num_kv_tokens: int) -> None:
        """D.Reserve for `num_kv_tokens` in all (again: D grows the reservation)."""
        num_kv_tokens = min(num_kv_tokens, self._engine.max_model_len - 1)
        reservation = pb.ReserveRequest(
            request_id=self.request_id,
            prompt_token_ids=request.prompt_token_ids,
            params=params_message(request.params),
            num_kv_tokens=num_kv_tokens,
            layout=layout_message(self._engine.layout().to_dict()),
            sender=self._service.peer,
            link_id=self._link.link_id,
            router_id=self.router_id,
            deadline_seconds=self.limits.lease,
        )
        try:
            self._stub.Reserve(reservation, timeout=self._remaining())
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                detail = f"{self.destination.instance_id}: {exc.details()}"
                raise Abort("destination_full", detail) from exc
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # D restarted since linking
                self._service.links.drop(self._link)  # the next migration links afresh
                detail = f"{self.destination.instance_id}: {exc.details()}"
                raise Abort("link_failed", detail) from exc
            raise self._rpc_abort("destination_failed", exc) from exc
        self._reserved_tokens = num_kv_tokens

    def _send(self, block_ids: list[int], running: bool) -> None:
        """One stage: these blocks, read and sent; while the request runs (`running`),
        only full blocks, which are never written again."""
        self.stages += 1
        if not block_ids:
            return
        data, crc = self._engine.read_blocks(block_ids)  # off the engine's thread
        if running:
            self._full_blocks()  # still its blocks: what was read is its KV
        try:
            self.kv_bytes += send_blocks(
                self._stub,
                self._link,
                self.request_id,
                self._copied,
                data,
                crc,
                len(block_ids) * self._engine.config.block_size,
                0,
                self._remaining(),
            )
        except LinkError as exc:
            self._service.links.drop(self._link)
            raise Abort("link_failed", f"KV link to {self.destination.instance_id}: {exc}") from exc
        except grpc.RpcError as exc:
            raise self._rpc_abort("destination_failed", exc) from exc
        self._copied += len(block_ids)

    # -- rollback ----------------------------------------------------------------------------

    def _roll_back(self, abort: Abort) -> None:
        logger.info("migration of %s to %s aborted: %s", self.request_id, self.destination, abort)
        if self.state == MigrationState.CONNECTING:
            pass  # nothing asked of D yet
        elif not self._abort_at_destination(f"migration aborted: {abort}"):
            logger.warning(
                "could not reach %s to undo the migration of %s; its lease frees the blocks",
                self.destination.instance_id,
                self.request_id,
            )
        if self.state in (MigrationState.PAUSED, MigrationState.COMMITTING):
            self._call(self._engine.resume, self.request_id)  # False if it ended meanwhile
        self.state = MigrationState.ABORTED

    def _abort_at_destination(self, reason: str) -> bool:
        try:
            self._stub.Abort(
                pb.AbortRequest(request_id=self.request_id, reason=reason),
                timeout=self.limits.stage_deadline,
            )
        except grpc.RpcError:
            return False
        return True

    # -- helpers -----------------------------------------------------------------------------

    def _enter(self, state: MigrationState) -> None:
        self.state = state
        self._stage_started = time.monotonic()

    def _remaining(self) -> float:
        left = self._stage_started + self.limits.stage_deadline - time.monotonic()
        if left <= 0:
            raise Abort(
                "deadline",
                f"{self.state.value} took longer than {self.limits.stage_deadline:g} s",
            )
        return left

    def _rpc(self, reason: str, method: Callable[..., Any], message: Any) -> Any:
        try:
            return method(message, timeout=self._remaining())
        except grpc.RpcError as exc:
            raise self._rpc_abort(reason, exc) from exc

    def _rpc_abort(self, reason: str, exc: grpc.RpcError) -> Abort:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            reason = "deadline"
        return Abort(reason, f"{self.destination.instance_id}: {exc.code().name}: {exc.details()}")

    def _reply(self, started: float, reason: str, detail: str) -> pb.MigrateReply:
        return pb.MigrateReply(
            committed=self.state == MigrationState.COMMITTED,
            abort_reason=reason,
            detail=detail,
            stages=self.stages,
            kv_bytes=self.kv_bytes,
            downtime_seconds=self.downtime_s,
            total_seconds=time.perf_counter() - started,
            num_kv_tokens=self.num_kv_tokens,
        )


def _not_decoding(exc: MigrationError) -> Abort:
    reason = "finished" if "not on this instance" in str(exc) else "not_decoding"
    return Abort(reason, str(exc))


def params_message(params: Any) -> pb.SamplingParams:
    """The wire form of an engine SamplingParams."""
    names = pb.SamplingParams.DESCRIPTOR.fields_by_name
    return params_from_dict({name: getattr(params, name) for name in names})
