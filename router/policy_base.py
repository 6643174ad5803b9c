"""The contract between the router and a routing policy.

The router calls RoutingPolicy.choose() once per request, with what a policy knows
of the request (RouteRequest) and the instances that can take work now (Candidate,
each with its load, or None when unknown or stale), and sends the request where
the returned Route says. The policies themselves, and their registry by name, are
in router.policy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from router.load import InstanceLoad, Role, StepTimeModel


@dataclass(frozen=True)
class RouteRequest:
    """What a policy knows of a request: its prompt (or only the prompt's length, when
    `prompt_token_ids` is None) and its SLO class and TTFT target, if any."""

    prompt_token_ids: Sequence[int] | None = None
    num_tokens: int | None = None  # only when prompt_token_ids is None
    slo_class: str | None = None
    ttft_target_s: float | None = None

    def __post_init__(self) -> None:
        if (self.prompt_token_ids is None) == (self.num_tokens is None):
            raise ValueError("a RouteRequest takes prompt_token_ids or num_tokens, exactly one")

    @property
    def num_prompt_tokens(self) -> int:
        if self.prompt_token_ids is not None:
            return len(self.prompt_token_ids)
        return self.num_tokens or 0


@dataclass(frozen=True)
class Candidate:
    """An instance that can take a request now, as a policy sees it."""

    instance_id: str
    role: Role
    num_in_flight: int = 0  # requests this router has on it
    load: InstanceLoad | None = None  # None: unknown or stale
    step_model: StepTimeModel | None = None  # None: never reported


@dataclass(frozen=True)
class Route:
    """Where one request runs: prefill on `prefill_id` then decode on `decode_id`,
    or everything on the colocated instance `decode_id` when `prefill_id` is None.
    `predicted_ttft_s` is set by policies that predict it (slo_aware)."""

    decode_id: str
    prefill_id: str | None = None
    predicted_ttft_s: float | None = field(default=None, compare=False)

    @property
    def disaggregated(self) -> bool:
        return self.prefill_id is not None

    @property
    def instance_ids(self) -> tuple[str, ...]:
        """The instances that hold the request at some point: prefill first."""
        return (self.decode_id,) if self.prefill_id is None else (self.prefill_id, self.decode_id)


class RoutingPolicy(ABC):
    """Chooses where each request runs. A policy implements _choose(), and may keep
    state between calls (whose turn it is, which prefixes went where)."""

    def choose(self, request: RouteRequest | int, candidates: Sequence[Candidate]) -> Route:
        """Pick a route for `request` (an int: a prompt of that many unknown tokens).

        Before: `candidates` are the healthy instances, in a stable order.
        After: the route names candidates only: a prefill and a decode instance, or one
        colocated instance. Raises NoInstanceError when no route exists.
        """
        if isinstance(request, int):
            request = RouteRequest(num_tokens=request)
        return self._choose(request, candidates)

    @abstractmethod
    def _choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> Route:
        """choose() with the request normalised; the same contract."""
