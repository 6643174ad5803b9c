"""Continuous batching with a token budget per step, stall-free (Sarathi-Serve).

Each step, in order:
  1. `_schedule_decodes`:  every running request whose context is computed gets
     its one token. If the pool has no block for it, the lowest-priority
     (latest admitted) running request is preempted by recompute.
  2. `_schedule_chunks`:   running requests still mid-prompt get the next chunk
     of their prompt, as much as the budget left allows.
  3. `_admit_waiting`:     waiting requests are admitted in arrival order (their
     cached prefix skipped), each with a first chunk, until the budget, the
     sequence limit or the free blocks run out.

Decodes never wait behind a long prompt: a prompt is cut into chunks that fill
what the decodes leave of the budget. The scheduler never touches tensors.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from engine.kv.block_pool import InvariantError
from engine.kv.cache_manager import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step: tokens [start_pos, start_pos + len(token_ids))."""

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]  # the request's whole block table
    sample: bool  # this chunk reaches the request's last token: sample the next one


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in priority order: earliest admitted first
        self.reserved: dict[str, Request] = {}  # KV arriving from another engine
        self.held: dict[str, Request] = {}  # KV being handed to another engine
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.reserved) + len(self.held)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def reserve(self, request: Request, num_kv_tokens: int) -> bool:
        """Allocates blocks for KV computed elsewhere; False if there is no room."""
        if len(self.running) + len(self.reserved) >= self.max_num_seqs:
            return False
        if not self.kv.allocate(request, num_kv_tokens):
            return False
        request.status = RequestStatus.RESERVED
        self.reserved[request.request_id] = request
        return True

    def commit(self, request: Request, num_computed_tokens: int) -> None:
        """A reserved request's KV has arrived: it joins the running batch."""
        del self.reserved[request.request_id]
        request.num_computed_tokens = num_computed_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def hold(self, request: Request) -> None:
        """Takes a prefilled request out of the batch, keeping its blocks for the handoff."""
        self.running.remove(request)
        request.status = RequestStatus.HELD
        self.held[request.request_id] = request

    def resume(self, request: Request) -> None:
        """A held request goes back into the running batch (a migration rolled back)."""
        del self.held[request.request_id]
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def grow(self, request: Request, num_kv_tokens: int) -> bool:
        """A reserved request gets room for `num_kv_tokens` in all; False if none is free."""
        return self.kv.allocate(request, num_kv_tokens)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Ends a request in any state and frees its blocks."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request.status == RequestStatus.RESERVED:
            del self.reserved[request.request_id]
        elif request.status == RequestStatus.HELD:
            del self.held[request.request_id]
        self.kv.free(request)
        request.status = status

    def schedule(self) -> SchedulerOutput:
        budget = [self.max_num_batched_tokens]
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        self._schedule_decodes(budget, scheduled, preempted)
        self._schedule_chunks(budget, scheduled)
        if not preempted:
            self._admit_waiting(budget, scheduled)
        return SchedulerOutput(scheduled, [r.request_id for r in preempted])

    def _schedule_decodes(
        self, budget: list[int], scheduled: list[ScheduledRequest], preempted: list[Request]
    ) -> None:
        for request in [r for r in self.running if is_decoding(r)]:
            if budget[0] == 0 or request.status != RequestStatus.RUNNING:
                continue  # out of budget, or preempted below to make room for a higher one
            while not self.kv.allocate(request, 1):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if request.status == RequestStatus.RUNNING:
                scheduled.append(self._chunk(request, 1))
                budget[0] -= 1

    def _schedule_chunks(self, budget: list[int], scheduled: list[ScheduledRequest]) -> None:
        for request in [r for r in self.running if not is_decoding(r)]:
            num_new = min(request.num_tokens - request.num_computed_tokens, budget[0])
            if num_new > 0 and self.kv.allocate(request, num_new):
                scheduled.append(self._chunk(request, num_new))
                budget[0] -= num_new

    def _admit_waiting(self, budget: list[int], scheduled: list[ScheduledRequest]) -> None:
        while self.waiting and budget[0] > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            hits = self.kv.match_prefix(request)
            num_cached = len(hits) * self.kv.block_size
            num_new = min(request.num_tokens - num_cached, budget[0])
            if not self.kv.allocate(request, num_new, hits):
                break  # first come, first served: no overtaking the head of the queue
            self.waiting.popleft()
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._chunk(request, num_new))
            budget[0] -= num_new

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    @staticmethod
    def _chunk(request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        end = start + num_new
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.token_ids[start:end],
            start_pos=start,
            block_ids=list(request.block_ids),
            sample=end == request.num_tokens,
        )

    def check_invariants(self) -> None:
        """Every block's ref count equals the number of requests holding it."""
        self.kv.check_invariants()
        holding = [*self.running, *self.reserved.values(), *self.held.values()]
        holders = Counter(b for r in holding for b in r.block_ids)
        for block_id in range(self.kv.pool.num_blocks):
            if self.kv.pool.ref_count(block_id) != holders[block_id]:
                raise InvariantError(
                    f"block {block_id}: ref_count {self.kv.pool.ref_count(block_id)}, "
                    f"held by {holders[block_id]} requests"
                )
        for r in self.waiting:
            if r.block_ids or r.status != RequestStatus.WAITING:
                raise InvariantError(
                    f"waiting request {r.request_id} holds blocks or is {r.status.name}"
                )
        for r in self.running:
            if len(r.block_ids) < self.kv.blocks_for(r.num_computed_tokens):
                raise InvariantError(f"request {r.request_id} computed tokens beyond its blocks")
        groups = ((self.reserved, RequestStatus.RESERVED), (self.held, RequestStatus.HELD))
        for group, status in groups:
            for r in group.values():
                if r.status != status:
                    raise InvariantError(f"{r.request_id} is {r.status.name}, not {status.name}")


def is_decoding(request: Request) -> bool:
    return request.num_computed_tokens == request.num_tokens - 1 and request.num_computed_tokens > 0
