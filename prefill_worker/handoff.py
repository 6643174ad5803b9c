"""A prefill instance's side of one request's KV handoff, and the threads that send it.

A Handoff is one request's state on its way to a decode instance (D); its Deadlines
bound each RPC. The HandoffSender runs the transfers PrefillService queues, in the
order they were queued, on one thread per decode instance, so that a slow D or a broken
link holds up no other:

    queue_reserve ─▶ D.Reserve, retried with backoff while D is full (reserve);
                     linked again, once, if D does not know the link (it restarted)
    queue_blocks  ─▶ D.ReceiveBlocks and the blocks' bytes on the link (transfer)
    queue_commit  ─▶ D.Commit (commit) ─▶ on_committed(handoff, seconds, tail_seconds)

A transfer that fails (a deadline, a broken link, D refusing) calls on_failed(handoff,
code, message); a broken link is dropped first. Jobs of a handoff that is done are
skipped. What is sent when, and how a request ends, is PrefillService's business.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from cluster.worker_base import send_blocks
from engine.kv.link import KVLink, LinkError, LinkManager
from engine.threads import run_torch_single_threaded
from proto.tandem.internal.v1 import worker_pb2 as pb
from proto.tandem.internal.v1 import worker_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass
class Deadlines:
    reserve: float = 60.0  # D found room for the request (it waits while D is full)
    transfer: float = 30.0  # one chunk sent and acknowledged
    commit: float = 10.0  # D.Commit answered
    lease: float = 300.0  # D frees the reservation if nothing arrives for this long


@dataclass
class Handoff:
    request_id: str
    decode: pb.Peer
    stub: worker_pb2_grpc.WorkerStub
    link: KVLink
    reservation: pb.ReserveRequest  # sent to D when the first blocks are ready
    events: queue.Queue[pb.PrefillEvent] = field(default_factory=queue.Queue)
    blocks_queued: int = 0  # blocks handed to the sender so far
    reserve_queued: bool = False
    reserved: bool = False  # D holds blocks for it (so an ending must tell D)
    final_queued: bool = False
    done: bool = False  # committed, failed or aborted: nothing more is sent
    kv_bytes: int = 0
    num_chunks: int = 0
    first_send: float | None = None
    first_token_time: float | None = None

    def abort_peer(self, timeout: float) -> None:
        """Tells D to drop the request (best effort: a D that is gone frees it by lease)."""
        try:
            self.stub.Abort(
                pb.AbortRequest(request_id=self.request_id, reason="handoff abandoned"),
                timeout=timeout,
            )
        except grpc.RpcError as exc:  # D is gone: its lease frees the blocks
            logger.info("abort of %s on %s: %s", self.request_id, self.decode.address, exc)


@dataclass
class _Job:
    handoff: Handoff
    kind: str  # "reserve", "blocks" or "commit"
    payload: Any


class HandoffSender:
    """Sends handoffs' RPCs and KV blocks, in order per link; see the module docstring.
    The queue_* methods return at once (any thread); the work runs on the link's thread."""

    def __init__(
        self,
        links: LinkManager,
        deadlines: Deadlines,
        on_committed: Callable[[Handoff, float, float], None],
        on_failed: Callable[[Handoff, str, str], None],
        connect: Callable[[pb.Peer], KVLink],
    ) -> None:
        self.links = links
        self.deadlines = deadlines
        self._on_committed = on_committed
        self._on_failed = on_failed
        self._connect = connect  # the link to a D, made anew if the last one was dropped
        self._lock = threading.Lock()
        self._queues: dict[str, queue.Queue[_Job | None]] = {}  # D's instance id -> its jobs
        self._kv_bytes_sent = 0

    @property
    def kv_bytes_sent(self) -> int:
        with self._lock:
            return self._kv_bytes_sent

    def queue_reserve(self, handoff: Handoff) -> None:
        self._put(_Job(handoff, "reserve", None))

    def queue_blocks(
        self, handoff: Handoff, start: int, data: Any, num_tokens: int, crc: int, first_layer: int
    ) -> None:
        """Blocks [start, start + data.shape[1]) of the request's KV, from engine.read_kv
        with their checksum `crc`: layers from first_layer on, holding num_tokens tokens."""
        self._put(_Job(handoff, "blocks", (start, data, num_tokens, crc, first_layer)))

    def queue_commit(
        self, handoff: Handoff, output_token_ids: list[int], num_kv_tokens: int
    ) -> None:
        self._put(_Job(handoff, "commit", (output_token_ids, num_kv_tokens)))

    def stop(self) -> None:
        """Ends every link's thread once the jobs queued before it are done."""
        with self._lock:
            for jobs in self._queues.values():
                jobs.put(None)

    def _put(self, job: _Job) -> None:
        peer_id = job.handoff.decode.instance_id
        with self._lock:
            jobs = self._queues.get(peer_id)
            if jobs is None:
                jobs = self._queues[peer_id] = queue.Queue()
                threading.Thread(
                    target=self._run, args=(jobs,), name=f"send-{peer_id}", daemon=True
                ).start()
        jobs.put(job)

    def _run(self, jobs: queue.Queue[_Job | None]) -> None:
        run_torch_single_threaded()
        while (job := jobs.get()) is not None:
            handoff = job.handoff
            if handoff.done:
                continue
            try:
                if job.kind == "reserve":
                    self._reserve(handoff)
                elif job.kind == "blocks":
                    self._send_blocks(handoff, *job.payload)
                else:
                    self._commit(handoff, *job.payload)
            except (LinkError, grpc.RpcError) as exc:
                if isinstance(exc, LinkError):
                    self.links.drop(handoff.link)
                message = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                code = exc.code().name if isinstance(exc, grpc.RpcError) else "UNAVAILABLE"
                self._on_failed(
                    handoff, code, f"KV handoff to {handoff.decode.instance_id}: {message}"
                )
            except Exception as exc:  # a bug: fail this request, keep the thread
                logger.exception("handoff of %s", handoff.request_id)
                self._on_failed(handoff, "INTERNAL", f"KV handoff failed: {exc}")

    def _reserve(self, handoff: Handoff) -> None:
        """D.Reserve, retried with backoff while D is full, up to the reserve deadline.
        A D that does not know the link (it restarted since the link was made) gets a new
        one, once; the handoff's later jobs, queued behind this one, use it."""
        deadline = time.monotonic() + self.deadlines.reserve
        wait = 0.05
        relinked = False
        while True:
            try:
                handoff.stub.Reserve(handoff.reservation, timeout=self.deadlines.commit)
                handoff.reserved = True
                if handoff.done:  # aborted while the reservation was on its way
                    handoff.abort_peer(self.deadlines.commit)
                return
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    self.links.drop(handoff.link)  # the next request links afresh
                    if relinked:
                        raise
                    logger.info("new link to %s: %s", handoff.decode.instance_id, exc.details())
                    handoff.link = self._connect(handoff.decode)  # the live one, if made since
                    handoff.reservation.link_id = handoff.link.link_id
                    relinked = True
                    continue
                full = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                if not full or time.monotonic() + wait > deadline or handoff.done:
                    raise
            time.sleep(wait)
            wait = min(wait * 2, 1.0)

    def _send_blocks(
        self, handoff: Handoff, start: int, data: Any, num_tokens: int, crc: int, first_layer: int
    ) -> None:
        if handoff.first_send is None:
            handoff.first_send = time.perf_counter()
        nbytes = send_blocks(
            handoff.stub,
            handoff.link,
            handoff.request_id,
            start,
            data,
            crc,
            num_tokens,
            first_layer,
            self.deadlines.transfer,
        )
        handoff.kv_bytes += nbytes
        handoff.num_chunks += 1
        with self._lock:
            self._kv_bytes_sent += nbytes

    def _commit(self, handoff: Handoff, output_token_ids: list[int], num_kv_tokens: int) -> None:
        """D.Commit; then on_committed with the handoff's seconds (first block sent to
        commit answered) and its tail (first token sampled to commit answered)."""
        handoff.stub.Commit(
            pb.CommitRequest(
                request_id=handoff.request_id,
                output_token_ids=output_token_ids,
                num_kv_tokens=num_kv_tokens,
            ),
            timeout=self.deadlines.commit,
        )
        now = time.perf_counter()
        seconds = now - (handoff.first_send or now)
        tail = now - (handoff.first_token_time or now)
        self._on_committed(handoff, seconds, tail)
