"""A prefill instance: admits prompts, prefills them in chunks, hands the KV to a decode instance.

One request's handoff, with the deadline of each state:

    Prefill RPC ─▶ link to D (connect) ─▶ queued, then prefilled chunk by chunk
    D.Reserve (retried while D has no room, up to `reserve`): at once if the prompt
        runs in the next step, else when its first chunk is done
    after every step: the full blocks that step filled ─▶ D.ReceiveBlocks + bytes on
        the link (transfer_timeout per transfer)
    during the step of the final chunk: its blocks, one group of layers at a time, as
        soon as the group's layers have written them (kv_layer_groups)
    first token sampled ─▶ streamed to the router at once; the request is HELD
    D.Commit (commit_timeout) ─▶ D acknowledged ─▶ blocks released here ─▶ HandoffDone

Earlier chunks leave while later ones compute, and the final chunk leaves layer
group by layer group while the rest of its step computes, so the first token waits
only for the last group, which travels while the logits are sampled. On any failure
(a deadline, a broken link, D refusing) the request is aborted here, its blocks are
freed, D is told explicitly with Abort, and the router gets a Failure event.
This module decides what is sent when; handoff.py holds a request's Handoff state
and the HandoffSender, which runs the transfers over one link in order on that
link's thread, so other links are not disturbed.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import grpc

from cluster.worker_base import (
    WorkerServicer,
    delta_message,
    layout_message,
    sampling_params,
)
from engine.engine import LLMEngine
from engine.errors import InvalidRequestError
from engine.kv.link import LinkError, LinkManager
from engine.loop import EngineLoop
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerOutput
from prefill_worker.handoff import Deadlines, Handoff, HandoffSender
from proto.tandem.internal.v1 import worker_pb2 as pb


class PrefillService(WorkerServicer):
    role = "prefill"

    def __init__(
        self,
        engine: LLMEngine,
        instance_id: str,
        links: LinkManager,
        deadlines: Deadlines | None = None,
        layer_groups: int = 3,
        loop: EngineLoop | None = None,
    ) -> None:
        """`loop`: one that built `engine` on its thread (EngineLoop.spawn); default, a new one."""
        super().__init__(instance_id)
        self.engine = engine
        self.links = links
        self.deadlines = deadlines or Deadlines()
        self.block_size = engine.config.block_size
        self.loop = (loop or EngineLoop(engine)).attach(self._on_outputs, self._after_step)
        num_layers = len(engine.kv_cache.layers)
        groups = max(1, min(layer_groups, num_layers))
        bounds = [round(num_layers * g / groups) for g in range(groups + 1)]
        self._layer_groups = {b - 1: range(a, b) for a, b in itertools.pairwise(bounds)}
        engine.layer_listener = self._on_layer
        self._lock = threading.Lock()
        self._handoffs: dict[str, Handoff] = {}
        self.sender = HandoffSender(
            links, self.deadlines, self._committed, self._fail, self.connect_link
        )
        self.handoffs_completed = 0
        self.handoffs_failed = 0
        self.handoff_seconds_total = 0.0

    @property
    def kv_bytes_sent(self) -> int:
        return self.sender.kv_bytes_sent

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.sender.stop()
        self.loop.stop()

    # ---- the router's calls -----------------------------------------------------------------

    def Prefill(self, request: pb.PrefillRequest, context: grpc.ServicerContext) -> Any:
        params = sampling_params(SamplingParams, request.params, context)
        request_id = request.request_id
        stub = self.stub(request.decode.address)
        try:
            link = self.connect_link(request.decode)
        except LinkError as exc:
            yield _failure("UNAVAILABLE", f"decode instance {request.decode.instance_id}: {exc}")
            return
        reservation = pb.ReserveRequest(
            request_id=request_id,
            prompt_token_ids=request.prompt_token_ids,
            params=request.params,
            num_kv_tokens=len(request.prompt_token_ids) + len(request.output_token_ids),
            layout=layout_message(self.engine.layout().to_dict()),
            sender=self.peer,
            link_id=link.link_id,
            router_id=request.router_id,
            deadline_seconds=self.deadlines.lease,
        )
        handoff = Handoff(request_id, request.decode, stub, link, reservation)
        with self._lock:
            self._handoffs[request_id] = handoff
        context.add_callback(lambda: self._cancel(handoff, "the router went away"))
        try:
            self.loop.call(
                self._admit,
                handoff,
                list(request.prompt_token_ids),
                params,
                list(request.output_token_ids),
            )
        except InvalidRequestError as exc:
            self._end(handoff, abort_peer=True)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        while True:
            event = handoff.events.get()
            yield event
            if event.HasField("handoff") or event.HasField("failure"):
                return
            if event.first_token.finished:
                return

    def _admit(
        self, handoff: Handoff, prompt: list[int], params: SamplingParams, outputs: list[int]
    ) -> None:
        """Queues the prompt (loop thread). If it will run in the next step, D is asked
        for room now, so the reservation is not on the first token's path; behind a
        longer queue it waits for the first chunk, so queued prompts hold no blocks on D."""
        queued = self.engine.num_queued_prefill_tokens()
        self.engine.add_request(
            prompt,
            params,
            request_id=handoff.request_id,
            hold_after_prefill=True,
            output_token_ids=outputs,
        )
        if queued < self.engine.config.max_num_batched_tokens:
            handoff.reserve_queued = True
            self.sender.queue_reserve(handoff)

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortReply:
        with self._lock:
            handoff = self._handoffs.get(request.request_id)
        if handoff is None:
            found = self.loop.call(self._abort_local, request.request_id)
            return pb.AbortReply(found=found)
        self._cancel(handoff, request.reason or "aborted")
        return pb.AbortReply(found=True)

    def _abort_local(self, request_id: str) -> bool:
        found = request_id in self.engine.requests
        self.engine.abort_request(request_id)
        return found

    # ---- the engine loop's hooks (loop thread) ------------------------------------------------

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            with self._lock:
                handoff = self._handoffs.get(output.request_id)
            if handoff is None or handoff.done:
                continue
            if output.finished:
                # Finished by its first token (EOS, a stop, max_tokens=1) or aborted:
                # nothing to hand over, and D's reservation is no longer needed.
                handoff.events.put(pb.PrefillEvent(first_token=delta_message(output)))
                self._end(handoff, abort_peer=True)
                continue
            handoff.first_token_time = time.perf_counter()
            handoff.events.put(pb.PrefillEvent(first_token=delta_message(output)))
            self._queue_blocks(handoff, final=True)
            num_kv_tokens = len(output.prompt_token_ids) + len(output.token_ids) - 1
            self.sender.queue_commit(handoff, list(output.token_ids), num_kv_tokens)

    def _after_step(self) -> None:
        with self._lock:
            pending = [h for h in self._handoffs.values() if not h.final_queued and not h.done]
        for handoff in pending:
            self._queue_blocks(handoff, final=False)

    def _on_layer(self, batch: SchedulerOutput, layer: int) -> None:
        """Mid-step: ships a prompt's final chunk one group of layers at a time, so
        only the last group (sent while the first token is sampled) is left after it."""
        layers = self._layer_groups.get(layer)
        if layers is None:
            return
        last = layers.stop == len(self.engine.kv_cache.layers)
        for item in batch.scheduled:
            if not item.sample:  # not the chunk that ends its prompt
                continue
            with self._lock:
                handoff = self._handoffs.get(item.request_id)
            if handoff is None or handoff.done or handoff.final_queued:
                continue
            num_tokens = item.start_pos + len(item.token_ids)
            start, end = handoff.blocks_queued, -(-num_tokens // self.block_size)
            if last:
                handoff.blocks_queued, handoff.final_queued = end, True
            if end > start:
                self._queue_range(handoff, start, end, num_tokens, layers)

    def _queue_blocks(self, handoff: Handoff, final: bool) -> None:
        """Sends the blocks computed since the last call: full ones, and with `final` the last."""
        request = self.engine.requests.get(handoff.request_id)
        if request is None:
            return
        num_computed = request.num_computed_tokens
        end = -(-num_computed // self.block_size) if final else num_computed // self.block_size
        if final:
            handoff.final_queued = True
        if end <= handoff.blocks_queued:
            return
        start, handoff.blocks_queued = handoff.blocks_queued, end
        self._queue_range(handoff, start, end, num_computed, None)

    def _queue_range(
        self, handoff: Handoff, start: int, end: int, num_tokens: int, layers: range | None
    ) -> None:
        """Queues blocks [start, end) (of `layers`, default all) of a request whose KV
        holds num_tokens tokens; asks D for room first if nobody has yet."""
        if not handoff.reserve_queued:
            handoff.reserve_queued = True
            self.sender.queue_reserve(handoff)
        data, checksum = self.engine.read_kv(handoff.request_id, start, end, layers)
        filled = min(num_tokens, end * self.block_size) - start * self.block_size
        first_layer = 0 if layers is None else layers.start
        self.sender.queue_blocks(handoff, start, data, filled, checksum, first_layer)

    # ---- endings -------------------------------------------------------------------------------

    def _end(self, handoff: Handoff, abort_peer: bool) -> bool:
        """Frees the request here (once); tells D to drop it if asked. False if already ended."""
        with self._lock:
            if handoff.done:
                return False
            handoff.done = True
            self._handoffs.pop(handoff.request_id, None)
        self.loop.submit(self.engine.release, handoff.request_id)
        if abort_peer and handoff.reserved:
            threading.Thread(
                target=handoff.abort_peer, args=(self.deadlines.commit,), daemon=True
            ).start()
        return True

    def _committed(self, handoff: Handoff, seconds: float, tail_seconds: float) -> None:
        """D acknowledged the commit (sender thread): the handoff is done."""
        if not self._end(handoff, abort_peer=False):
            return  # aborted meanwhile: _cancel told D
        with self._lock:
            self.handoffs_completed += 1
            self.handoff_seconds_total += seconds
        handoff.events.put(
            pb.PrefillEvent(
                handoff=pb.HandoffDone(
                    decode_instance_id=handoff.decode.instance_id,
                    kv_bytes=handoff.kv_bytes,
                    seconds=seconds,
                    tail_seconds=tail_seconds,
                    num_chunks=handoff.num_chunks,
                )
            )
        )

    def _fail(self, handoff: Handoff, code: str, message: str) -> None:
        if self._end(handoff, abort_peer=True):
            with self._lock:
                self.handoffs_failed += 1
            handoff.events.put(_failure(code, message))

    def _cancel(self, handoff: Handoff, reason: str) -> None:
        if self._end(handoff, abort_peer=True):
            handoff.events.put(_failure("CANCELLED", reason))

    # ---- plumbing ------------------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {
                "handoffs_completed": self.handoffs_completed,
                "handoffs_failed": self.handoffs_failed,
                "kv_bytes_sent": self.sender.kv_bytes_sent,
                "handoff_seconds_total": self.handoff_seconds_total,
            }


def _failure(code: str, message: str) -> pb.PrefillEvent:
    return pb.PrefillEvent(failure=pb.Failure(code=code, message=message))
