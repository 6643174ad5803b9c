"""Routing policies: which prefill and which decode instance take a new request.

A policy is plain Python (no gRPC, no asyncio) so it can be tested alone. The router
calls `choose()` once per request with the instances that can take work now, and
sends the request where the returned Route says. New policies are new subclasses,
registered by name in POLICIES.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from router.errors import NoInstanceError


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


@dataclass(frozen=True)
class Candidate:
    """An instance that can take a request now, as a policy sees it."""

    instance_id: str
    role: Role
    num_in_flight: int = 0  # requests this router has on it


@dataclass(frozen=True)
class Route:
    """Where one request runs: prefill on `prefill_id` then decode on `decode_id`,
    or everything on the colocated instance `decode_id` when `prefill_id` is None."""

    decode_id: str
    prefill_id: str | None = None

    @property
    def disaggregated(self) -> bool:
        return self.prefill_id is not None


class RoutingPolicy(ABC):
    @abstractmethod
    def choose(self, num_prompt_tokens: int, candidates: Sequence[Candidate]) -> Route:
        """Pick a route for a request of `num_prompt_tokens` prompt tokens.

        Before: `candidates` are the healthy instances, in a stable order.
        After: the route names candidates only: a prefill and a decode instance, or one
        colocated instance. Raises NoInstanceError when no route exists.
        """


class RoundRobinPolicy(RoutingPolicy):
    """Prefill and decode instances each in turn; colocated ones in turn when there
    is no prefill/decode pair."""

    def __init__(self) -> None:
        self._turns = dict.fromkeys(Role, 0)

    def choose(self, num_prompt_tokens: int, candidates: Sequence[Candidate]) -> Route:
        ids = {role: [c.instance_id for c in candidates if c.role == role] for role in Role}
        if ids[Role.PREFILL] and ids[Role.DECODE]:
            return Route(
                decode_id=self._take(Role.DECODE, ids[Role.DECODE]),
                prefill_id=self._take(Role.PREFILL, ids[Role.PREFILL]),
            )
        if ids[Role.COLOCATED]:
            return Route(decode_id=self._take(Role.COLOCATED, ids[Role.COLOCATED]))
        raise NoInstanceError(_missing(candidates))

    def _take(self, role: Role, instance_ids: list[str]) -> str:
        turn = self._turns[role]
        self._turns[role] = turn + 1
        return instance_ids[turn % len(instance_ids)]


def _missing(candidates: Sequence[Candidate]) -> str:
    roles = sorted({c.role.value for c in candidates}) or ["none"]
    return (
        "no instance can take the request: it needs a prefill and a decode instance, or a "
        f"colocated one, and the healthy instances are: {', '.join(roles)}; "
        "check the workers' health (GET /status) and retry"
    )


POLICIES: dict[str, type[RoutingPolicy]] = {"round_robin": RoundRobinPolicy}


def make_policy(name: str) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return POLICIES[name]()
