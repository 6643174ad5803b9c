"""Which running requests to migrate, and where: pure policy (no Ray, gRPC or torch).

The caller (the router's migration loop, or the control plane) describes each decode
instance and the requests running on it, asks `plan()` for moves, and carries them out
with live migration:

    instances, requests ─▶ policy.plan() ─▶ [Move(request, source, destination)]

An instance's load is the fraction of its KV blocks that are in use or owed to
requests queued for it:

    load = (num_used_blocks + num_demand_blocks) / num_blocks

`balance` pairs the most loaded instance with the least loaded one while their loads
differ by more than `threshold`, and moves the requests with the fewest blocks first
(cheapest to copy), each only if the move narrows the gap and leaves the destination
`headroom` of its blocks free, for its own requests to grow into (a destination filled to
the brim preempts its requests, which then recompute). A draining instance is emptied
whatever its load, onto the least loaded instances that have room.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DecodeInstance:
    instance_id: str
    num_blocks: int
    num_used_blocks: int
    num_demand_blocks: int = 0  # blocks that requests queued for it will need
    draining: bool = False

    @property
    def load(self) -> float:
        return (self.num_used_blocks + self.num_demand_blocks) / max(self.num_blocks, 1)

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self.num_used_blocks - self.num_demand_blocks


@dataclass(frozen=True)
class RunningRequest:
    request_id: str
    instance_id: str
    num_blocks: int


@dataclass(frozen=True)
class Move:
    request_id: str
    source_id: str
    destination_id: str


class MigrationPolicy(ABC):
    """Plans moves from a snapshot. `plan` must not move a request twice, nor to its
    own instance or a draining one, nor to one without free blocks for it."""

    @abstractmethod
    def plan(
        self, instances: Sequence[DecodeInstance], requests: Sequence[RunningRequest]
    ) -> list[Move]: ...


class NoMigration(MigrationPolicy):
    def plan(
        self, instances: Sequence[DecodeInstance], requests: Sequence[RunningRequest]
    ) -> list[Move]:
        return []


class BalancePolicy(MigrationPolicy):
    def __init__(self, threshold: float = 0.2, max_moves: int = 4, headroom: float = 0.1) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"migration threshold must be in (0, 1], got {threshold}")
        if not 0 <= headroom < 1:
            raise ValueError(f"migration headroom must be in [0, 1), got {headroom}")
        if max_moves < 1:
            raise ValueError(f"max moves per round must be at least 1, got {max_moves}")
        self.threshold = threshold
        self.max_moves = max_moves
        self.headroom = headroom

    def plan(
        self, instances: Sequence[DecodeInstance], requests: Sequence[RunningRequest]
    ) -> list[Move]:
        state = {i.instance_id: i for i in instances}
        waiting = sorted(requests, key=lambda r: (r.num_blocks, r.request_id))
        moves = self._drain(state, waiting)
        while len(moves) < self.max_moves:
            move = self._balance_one(state, waiting, {m.request_id for m in moves})
            if move is None:
                break
            moves.append(move)
        return moves

    def _drain(
        self, state: dict[str, DecodeInstance], requests: list[RunningRequest]
    ) -> list[Move]:
        moves: list[Move] = []
        for request in requests:
            if len(moves) >= self.max_moves:
                break
            if not state[request.instance_id].draining:
                continue
            destination = _least_loaded(state, request.num_blocks)
            if destination is not None:
                moves.append(_apply(state, request, destination))
        return moves

    def _balance_one(
        self, state: dict[str, DecodeInstance], requests: list[RunningRequest], moved: set[str]
    ) -> Move | None:
        open_ = [i for i in state.values() if not i.draining]
        if len(open_) < 2:
            return None
        source = max(open_, key=lambda i: (i.load, i.instance_id))
        target = min(open_, key=lambda i: (i.load, i.instance_id))
        if source.load - target.load <= self.threshold:
            return None
        gap_blocks = (source.load - target.load) * min(source.num_blocks, target.num_blocks)
        room = target.num_free_blocks - math.ceil(self.headroom * target.num_blocks)
        for request in requests:  # fewest blocks first
            if request.request_id in moved or request.instance_id != source.instance_id:
                continue
            # A move of k blocks leaves a gap of |gap - 2k|: narrower only while k < gap.
            if request.num_blocks < gap_blocks and request.num_blocks <= room:
                return _apply(state, request, target)
        return None


def _least_loaded(state: dict[str, DecodeInstance], num_blocks: int) -> DecodeInstance | None:
    room = [i for i in state.values() if not i.draining and i.num_free_blocks >= num_blocks]
    return min(room, key=lambda i: (i.load, i.instance_id), default=None)


def _apply(
    state: dict[str, DecodeInstance], request: RunningRequest, destination: DecodeInstance
) -> Move:
    """The move, with both instances' loads updated as if it had happened."""
    source = state[request.instance_id]
    state[source.instance_id] = replace(
        source, num_used_blocks=source.num_used_blocks - request.num_blocks
    )
    state[destination.instance_id] = replace(
        destination, num_used_blocks=destination.num_used_blocks + request.num_blocks
    )
    return Move(request.request_id, source.instance_id, destination.instance_id)


POLICIES: dict[str, type[MigrationPolicy]] = {"off": NoMigration, "balance": BalancePolicy}


def make_policy(name: str, threshold: float = 0.2, max_moves: int = 4) -> MigrationPolicy:
    """The policy registered as `name`: "off" or "balance"."""
    if name == "off":
        return NoMigration()
    if name == "balance":
        return BalancePolicy(threshold, max_moves)
    raise ValueError(f"unknown migration policy {name!r}; choose one of {sorted(POLICIES)}")
