"""A decode instance: receives KV caches, decodes them in one continuous batch, streams tokens.

    Reserve(request, layout, link)   blocks allocated, request RESERVED, a lease starts
    ReceiveBlocks(header) x chunks   bytes over the KV link, checksum, written in place
    Commit(first tokens, KV count)   the request joins the running batch
    Subscribe(router)                every step, one StepBatch per router with the new
                                     tokens of all its requests
    Migrate(request, destination)    moves a running request to another decode
                                     instance while it runs (decode_worker/migration.py);
                                     the destination takes it by Reserve, ReceiveBlocks
                                     and Commit like a handoff from a prefill instance

Any failure frees the reservation: a checksum or shape mismatch, a broken link, an
explicit Abort from the sender, or the lease running out because the sender went
silent (it died, or lost the link). The router then gets the request's last delta as
an error that says why, never as a plain "abort" it might pass on as a finished
completion. In colocated mode the same instance also
takes prompts (Generate) and runs both phases with the same engine.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Any

import grpc
import torch

from cluster.worker_base import WorkerServicer, delta_message, sampling_params
from decode_worker.migration import Migration, MigrationLimits
from engine.engine import LLMEngine
from engine.errors import InvalidRequestError, KVImportError
from engine.kv.kv_cache import KVBlockMeta
from engine.kv.link import LinkError, LinkManager
from engine.loop import EngineLoop
from engine.outputs import RequestOutput
from engine.request import RequestStatus
from engine.sampling_params import SamplingParams
from proto.tandem.internal.v1 import worker_pb2 as pb

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DecodeService(WorkerServicer):
    role = "decode"

    def __init__(
        self,
        engine: LLMEngine,
        instance_id: str,
        links: LinkManager,
        colocated: bool = False,
        transfer_timeout: float = 30.0,
        loop: EngineLoop | None = None,
    ) -> None:
        """`loop`: one that built `engine` on its thread (EngineLoop.spawn); default, a new one."""
        super().__init__(instance_id)
        if colocated:
            self.role = "colocated"
        self.engine = engine
        self.links = links
        self.transfer_timeout = transfer_timeout
        self.loop = (loop or EngineLoop(engine)).attach(self._on_outputs)
        self._lock = threading.Lock()
        self._routes: dict[str, str] = {}  # request id -> router id
        self._subscribers: dict[str, queue.Queue[pb.StepBatch | None]] = {}
        self._leases: dict[str, float] = {}  # reserved request id -> monotonic deadline
        self._failed: dict[str, str] = {}  # reserved request id -> why its handoff failed
        self.kv_bytes_received = 0
        self.handoffs_completed = 0
        self.handoffs_failed = 0
        self.migration_limits = MigrationLimits()
        self.migrations: dict[str, int] = {}  # outcome ("committed" or why not) -> count
        self._migrating: set[str] = set()
        self._stopping = threading.Event()
        self._reaper = threading.Thread(target=self._reap_leases, name="leases", daemon=True)

    def start(self) -> None:
        self.loop.start()
        self._reaper.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            for subscriber in self._subscribers.values():
                subscriber.put(None)
        self.loop.stop()

    # ---- router side -----------------------------------------------------------------------

    def Subscribe(self, request: pb.SubscribeRequest, context: grpc.ServicerContext) -> Any:
        """One long-lived stream per router: every step's new tokens of its requests."""
        inbox: queue.Queue[pb.StepBatch | None] = queue.Queue()
        with self._lock:
            old = self._subscribers.get(request.router_id)
            self._subscribers[request.router_id] = inbox
        if old is not None:
            old.put(None)  # a reconnecting router replaces its old stream
        context.send_initial_metadata(())  # tells the router the stream is open
        try:
            while context.is_active() and not self._stopping.is_set():
                try:
                    batch = inbox.get(timeout=0.5)
                except queue.Empty:
                    continue
                if batch is None:
                    return
                yield batch
        finally:
            with self._lock:
                if self._subscribers.get(request.router_id) is inbox:
                    del self._subscribers[request.router_id]
                    orphans = [r for r, owner in self._routes.items() if owner == request.router_id]
                else:
                    orphans = []
            for request_id in orphans:  # nobody is left to read their tokens
                self.loop.submit(self._abort, request_id, "its router went away")

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Any:
        if self.role != "colocated":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a decode instance takes no prompts")
        params = sampling_params(SamplingParams, request.params, context)
        with self._lock:
            self._routes[request.request_id] = request.router_id
        try:
            self.loop.call(
                self.engine.add_request,
                list(request.prompt_token_ids),
                params,
                request_id=request.request_id,
                output_token_ids=list(request.output_token_ids),
            )
        except InvalidRequestError as exc:
            self._forget(request.request_id)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.GenerateReply()

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortReply:
        reason = request.reason or "the sender aborted it"
        found = self.loop.call(self._abort, request.request_id, reason, request.only_reserved)
        return pb.AbortReply(found=found)

    def _abort(self, request_id: str, reason: str, only_reserved: bool = False) -> bool:
        found = request_id in self.engine.requests
        with self._lock:
            reserved = request_id in self._leases  # not committed yet
            if only_reserved and not reserved:
                return False
            if self._leases.pop(request_id, None) is not None and found:
                self._failed[request_id] = reason
        self.engine.abort_request(request_id)
        return found

    # ---- live migration, sending side ----------------------------------------------------------

    def Migrate(self, request: pb.MigrateRequest, context: grpc.ServicerContext) -> Any:
        request_id = request.request_id
        if request.destination.instance_id == self.instance_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a request cannot migrate to itself")
        with self._lock:
            router_id = self._routes.get(request_id, "")
            busy = request_id in self._migrating
            if router_id and not busy:
                self._migrating.add(request_id)
        if not router_id:
            context.abort(grpc.StatusCode.NOT_FOUND, f"request {request_id!r} is not here")
        if busy:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{request_id!r} is moving already")
        limits = self.migration_limits
        limits = dataclasses.replace(
            limits,
            stage_deadline=request.stage_deadline_seconds or limits.stage_deadline,
            max_stages=request.max_stages or limits.max_stages,
            blocking=request.blocking,
        )
        try:
            reply = Migration(request_id, router_id, request.destination, self, limits).run()
        finally:
            with self._lock:
                self._migrating.discard(request_id)
        outcome = "committed" if reply.committed else reply.abort_reason
        with self._lock:
            self.migrations[outcome] = self.migrations.get(outcome, 0) + 1
        return reply

    def moved_away(self, request_id: str) -> bool:
        """On the engine's thread, once the destination has committed: frees the source's
        copy. False if the request ended here meanwhile (its client aborted)."""
        request = self.engine.requests.get(request_id)
        held = request is not None and request.status == RequestStatus.HELD
        self.engine.release(request_id)
        self._forget(request_id)
        return held

    # ---- the KV handoff, receiving side --------------------------------------------------

    def OpenLink(self, request: pb.OpenLinkRequest, context: grpc.ServicerContext) -> Any:
        try:
            self.links.accept(
                request.link_id, request.initiator.instance_id, request.timeout_seconds
            )
        except LinkError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return pb.OpenLinkReply()

    def Reserve(self, request: pb.ReserveRequest, context: grpc.ServicerContext) -> Any:
        params = sampling_params(SamplingParams, request.params, context)
        if request.link_id:
            try:
                self.links.get(request.link_id)
            except LinkError as exc:  # made with an earlier process of this instance
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{exc}: link again")
        layout = KVBlockMeta(
            **{f.name: getattr(request.layout, f.name) for f in pb.KVLayout.DESCRIPTOR.fields},
            num_tokens=request.num_kv_tokens,
            block_ids=[],
            checksum=0,
        )
        with self._lock:
            again = request.request_id in self._leases  # a sender asking for more room
            self._routes[request.request_id] = request.router_id
            self._leases[request.request_id] = time.monotonic() + request.deadline_seconds
        try:
            if again:
                num_blocks = self.loop.call(
                    self.engine.grow_reservation, request.request_id, request.num_kv_tokens
                )
            else:
                num_blocks = self.loop.call(
                    self.engine.reserve,
                    request.request_id,
                    list(request.prompt_token_ids),
                    params,
                    request.num_kv_tokens,
                    layout,
                )
        except (KVImportError, InvalidRequestError) as exc:
            if again:  # the first reservation stands until the sender aborts it
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            self._forget(request.request_id)
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            if isinstance(exc, InvalidRequestError) or "no room" not in str(exc):
                code = grpc.StatusCode.INVALID_ARGUMENT
            context.abort(code, str(exc))
        return pb.ReserveReply(num_blocks=num_blocks)

    def ReceiveBlocks(self, header: pb.BlocksHeader, context: grpc.ServicerContext) -> Any:
        request_id = header.request_id
        try:
            link = self.links.get(header.link_id)
            buffer = torch.empty(tuple(header.shape), dtype=_DTYPES[header.dtype])
            link.recv(buffer, header.tag, self.transfer_timeout)
        except (LinkError, KeyError) as exc:
            self._fail(request_id, f"KV transfer failed: {exc}")
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        with self._lock:
            if request_id in self._leases:  # each chunk renews the lease
                self._leases[request_id] = max(
                    self._leases[request_id], time.monotonic() + self.transfer_timeout
                )
        try:
            self.loop.call(
                self.engine.write_kv,
                request_id,
                header.start_block,
                buffer,
                header.checksum,
                header.layer_start,
            )
        except KVImportError as exc:
            self._fail(request_id, str(exc))
            context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        with self._lock:
            self.kv_bytes_received += buffer.numel() * buffer.element_size()
        return pb.BlocksAck()

    def Commit(self, request: pb.CommitRequest, context: grpc.ServicerContext) -> Any:
        try:
            self.loop.call(
                self._commit,
                request.request_id,
                list(request.output_token_ids),
                request.num_kv_tokens,
            )
        except KVImportError as exc:
            self._fail(request.request_id, str(exc))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.CommitReply()

    def _commit(self, request_id: str, output_ids: list[int], num_kv_tokens: int) -> None:
        self.engine.commit(request_id, output_ids, num_kv_tokens)
        with self._lock:
            self._leases.pop(request_id, None)
            self.handoffs_completed += 1

    def _fail(self, request_id: str, reason: str) -> None:
        """A handoff that cannot complete: free its reservation."""
        logger.warning("handoff of %s failed: %s", request_id, reason)
        with self._lock:
            self.handoffs_failed += 1
        self.loop.submit(self._abort, request_id, reason)

    def _reap_leases(self) -> None:
        while not self._stopping.wait(0.5):
            now = time.monotonic()
            with self._lock:
                lapsed = [r for r, deadline in self._leases.items() if deadline < now]
            for request_id in lapsed:
                self._fail(request_id, "its lease lapsed: the sender went silent")

    # ---- the step loop's outputs -----------------------------------------------------------

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        batches: dict[str, list[pb.TokenDelta]] = {}
        with self._lock:
            for output in outputs:
                router_id = self._routes.get(output.request_id)
                failure = None
                if output.finished:
                    self._routes.pop(output.request_id, None)
                    self._leases.pop(output.request_id, None)
                    failure = self._failed.pop(output.request_id, None)
                if router_id is None:
                    continue
                delta = delta_message(output)
                if failure is not None:
                    delta.finish_reason = "error"
                    delta.error = (
                        f"the KV handoff to decode instance {self.instance_id!r} failed "
                        f"({failure}); retry the request"
                    )
                batches.setdefault(router_id, []).append(delta)
            for router_id, deltas in batches.items():
                subscriber = self._subscribers.get(router_id)
                if subscriber is not None:
                    subscriber.put(pb.StepBatch(deltas=deltas))

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._routes.pop(request_id, None)
            self._leases.pop(request_id, None)
            self._failed.pop(request_id, None)

    # ---- Info and Status ---------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {
                "handoffs_completed": self.handoffs_completed,
                "handoffs_failed": self.handoffs_failed,
                "kv_bytes_received": self.kv_bytes_received,
                "migrations": dict(self.migrations),
            }
