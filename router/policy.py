"""Routing policies: which prefill and which decode instance take a new request.

A policy is plain Python (no gRPC, no asyncio) so it can be tested alone. The router
calls `choose()` once per request with the instances that can take work now (each with
its load from a LoadTracker, or None when unknown or stale), and sends the request
where the returned Route says; that contract (RouteRequest, Candidate, Route and
RoutingPolicy) is in router.policy_base. Policies are registered by name in POLICIES:

    round_robin    each pool in turn
    least_loaded   the lowest score (lower is less loaded):
                     prefill    queued prefill tokens
                     decode     kv_usage + (running + waiting) / max_num_seqs
                     colocated  the decode score + prefill_weight * queued prefill tokens
                                / max_num_batched_tokens (steps of prompt backlog)
    prefix_aware   the prefill (or colocated) instance this policy last sent the longest
                   prefix of the prompt to, so its prefix cache hits; least_loaded when
                   none matches or the match is overloaded (below); decode as least_loaded
    slo_aware      the prefill (or colocated) instance with the lowest predicted TTFT
                   (`predict_ttft`); decode as least_loaded

When any candidate of a pool has no load (never reported, or stale), the load-based
policies rank that pool by the router's own in-flight counts instead. Ties go to the
fewer in flight, then to the earlier candidate.
"""

from __future__ import annotations

import hashlib
import inspect
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from router.errors import NoInstanceError
from router.load import DEFAULT_STEP_TIME_MODEL, InstanceLoad, Role, StepTimeModel
from router.policy_base import Candidate, Route, RouteRequest, RoutingPolicy

__all__ = [
    "POLICIES",
    "Candidate",
    "LeastLoadedPolicy",
    "PrefixAwarePolicy",
    "Role",
    "RoundRobinPolicy",
    "Route",
    "RouteRequest",
    "RoutingPolicy",
    "SloAwarePolicy",
    "make_policy",
]

DEFAULT_BLOCK_SIZE = 16
DEFAULT_CHUNK_TOKENS = 512
DEFAULT_MAX_NUM_SEQS = 256  # the engine's default, for an instance that did not say


def _pools(candidates: Sequence[Candidate]) -> dict[Role, list[Candidate]]:
    return {role: [c for c in candidates if c.role == role] for role in Role}


def _missing(candidates: Sequence[Candidate]) -> str:
    roles = sorted({c.role.value for c in candidates}) or ["none"]
    return (
        "no instance can take the request: it needs a prefill and a decode instance, or a "
        f"colocated one, and the healthy instances are: {', '.join(roles)}; "
        "check the workers' health (GET /status) and retry"
    )


class RoundRobinPolicy(RoutingPolicy):
    """Prefill and decode instances each in turn; colocated ones in turn when there
    is no prefill/decode pair."""

    def __init__(self) -> None:
        self._turns = dict.fromkeys(Role, 0)

    def _choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> Route:
        pools = _pools(candidates)
        if pools[Role.PREFILL] and pools[Role.DECODE]:
            return Route(
                decode_id=self._take(Role.DECODE, pools[Role.DECODE]),
                prefill_id=self._take(Role.PREFILL, pools[Role.PREFILL]),
            )
        if pools[Role.COLOCATED]:
            return Route(decode_id=self._take(Role.COLOCATED, pools[Role.COLOCATED]))
        raise NoInstanceError(_missing(candidates))

    def _take(self, role: Role, pool: list[Candidate]) -> str:
        turn = self._turns[role]
        self._turns[role] = turn + 1
        return pool[turn % len(pool)].instance_id


# -- least loaded ----------------------------------------------------------------------


def prefill_score(load: InstanceLoad) -> float:
    return float(load.num_queued_prefill_tokens)


def decode_score(load: InstanceLoad) -> float:
    max_num_seqs = load.max_num_seqs or DEFAULT_MAX_NUM_SEQS
    return load.kv_usage + (load.num_running + load.num_waiting) / max_num_seqs


def colocated_score(load: InstanceLoad, prefill_weight: float) -> float:
    budget = load.max_num_batched_tokens or DEFAULT_CHUNK_TOKENS
    return decode_score(load) + prefill_weight * load.num_queued_prefill_tokens / budget


def least_loaded(pool: Sequence[Candidate], score: Callable[[InstanceLoad], float]) -> Candidate:
    """The candidate with the lowest score, or the fewest in flight when a load is unknown."""
    scored = [(score(c.load), c.num_in_flight, i) for i, c in enumerate(pool) if c.load is not None]
    if len(scored) < len(pool):
        return min(pool, key=lambda c: c.num_in_flight)
    return pool[min(scored)[2]]


class LeastLoadedPolicy(RoutingPolicy):
    """The least loaded instance of each pool, by the scores in the module docstring.
    `prefill_weight`: what each step's worth of queued prompt tokens adds to a colocated
    instance's score, where a full KV cache adds 1.0 and a full batch another 1.0."""

    def __init__(self, prefill_weight: float = 0.1) -> None:
        if prefill_weight < 0:
            raise ValueError(f"prefill_weight must be >= 0, got {prefill_weight}")
        self.prefill_weight = prefill_weight

    def _choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> Route:
        pools = _pools(candidates)
        if pools[Role.PREFILL] and pools[Role.DECODE]:
            prefill = least_loaded(pools[Role.PREFILL], prefill_score)
            return Route(
                decode_id=self.pick_decode(pools[Role.DECODE]), prefill_id=prefill.instance_id
            )
        if pools[Role.COLOCATED]:
            return Route(decode_id=self.pick_colocated(pools[Role.COLOCATED]).instance_id)
        raise NoInstanceError(_missing(candidates))

    def pick_decode(self, pool: Sequence[Candidate]) -> str:
        return least_loaded(pool, decode_score).instance_id

    def pick_colocated(self, pool: Sequence[Candidate]) -> Candidate:
        return least_loaded(pool, lambda load: colocated_score(load, self.prefill_weight))

    def pick_prompt_pool(self, pool: Sequence[Candidate]) -> Candidate:
        """The least loaded of the instances that would run the prompt (prefill or colocated)."""
        if pool[0].role is Role.COLOCATED:
            return self.pick_colocated(pool)
        return least_loaded(pool, prefill_score)


# -- prefix aware --------------------------------------------------------------------------


def prefix_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Chained hashes of the prompt's full blocks, as the engine's prefix cache makes them:
    hash i identifies tokens [0, (i + 1) * block_size). The last token is left out (the
    engine never serves it from the cache: its logits must be computed)."""
    hashes: list[bytes] = []
    num_full = (len(token_ids) - 1) // block_size
    for i in range(num_full):
        digest = hashlib.blake2b(hashes[-1] if hashes else b"", digest_size=16)
        digest.update(array("q", token_ids[i * block_size : (i + 1) * block_size]).tobytes())
        hashes.append(digest.digest())
    return hashes


class PrefixAwarePolicy(RoutingPolicy):
    """Sends a prompt where its longest prefix went last, so that instance's prefix cache
    serves it. Each instance keeps an LRU of the block hashes sent to it (at most
    `max_blocks_per_instance`). The match is refused, for least_loaded's choice, when

        queued(match) + prompt - cached(match) > overload_factor * (queued(least) + prompt
                                                                     - cached(least))

    (tokens to compute before this prompt's first token; by in-flight counts + 1 when a
    load is unknown). `block_size` must be the workers' KV block size to match their cache.
    """

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_blocks_per_instance: int = 65536,
        overload_factor: float = 2.0,
        prefill_weight: float = 0.1,
    ) -> None:
        if block_size < 1 or max_blocks_per_instance < 1:
            raise ValueError(
                f"block_size and max_blocks_per_instance must be >= 1, got {block_size} "
                f"and {max_blocks_per_instance}"
            )
        if overload_factor < 1:
            raise ValueError(f"overload_factor must be >= 1, got {overload_factor}")
        self.block_size = block_size
        self.max_blocks_per_instance = max_blocks_per_instance
        self.overload_factor = overload_factor
        self._least_loaded = LeastLoadedPolicy(prefill_weight)
        self._sent: dict[str, OrderedDict[bytes, int]] = {}  # instance -> hash -> tick
        self._tick = 0

    def _choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> Route:
        pools = _pools(candidates)
        hashes = self._hashes(request)
        if pools[Role.PREFILL] and pools[Role.DECODE]:
            prefill = self._pick(request, hashes, pools[Role.PREFILL])
            decode_id = self._least_loaded.pick_decode(pools[Role.DECODE])
            return Route(decode_id=decode_id, prefill_id=prefill.instance_id)
        if pools[Role.COLOCATED]:
            return Route(decode_id=self._pick(request, hashes, pools[Role.COLOCATED]).instance_id)
        raise NoInstanceError(_missing(candidates))

    def num_matched_tokens(self, request: RouteRequest, instance_id: str) -> int:
        """Prompt tokens of `request` this policy expects cached on the instance."""
        return self._match(self._hashes(request), instance_id)[0] * self.block_size

    def _hashes(self, request: RouteRequest) -> list[bytes]:
        if request.prompt_token_ids is None:
            return []
        return prefix_hashes(request.prompt_token_ids, self.block_size)

    def _pick(self, request: RouteRequest, hashes: list[bytes], pool: list[Candidate]) -> Candidate:
        least = self._least_loaded.pick_prompt_pool(pool)
        best = max(pool, key=lambda c: self._match(hashes, c.instance_id))
        num_best = self._match(hashes, best.instance_id)[0]
        chosen = least
        if num_best > 0 and not self._overloaded(request, hashes, best, least):
            chosen = best
        self._record(hashes, chosen.instance_id)
        return chosen

    def _overloaded(
        self, request: RouteRequest, hashes: list[bytes], match: Candidate, least: Candidate
    ) -> bool:
        if match.load is None or least.load is None:
            return match.num_in_flight + 1 > self.overload_factor * (least.num_in_flight + 1)
        num_prompt = request.num_prompt_tokens

        def cost(c: Candidate, load: InstanceLoad) -> int:
            cached = self._match(hashes, c.instance_id)[0] * self.block_size
            return load.num_queued_prefill_tokens + num_prompt - cached

        return cost(match, match.load) > self.overload_factor * cost(least, least.load)

    def _match(self, hashes: list[bytes], instance_id: str) -> tuple[int, int]:
        """(blocks of the longest prefix sent to the instance, when it was sent)."""
        sent = self._sent.get(instance_id)
        if sent:
            for i in range(len(hashes) - 1, -1, -1):
                tick = sent.get(hashes[i])
                if tick is not None:
                    return i + 1, tick
        return 0, 0

    def _record(self, hashes: list[bytes], instance_id: str) -> None:
        if not hashes:
            return
        self._tick += 1
        sent = self._sent.setdefault(instance_id, OrderedDict())
        for block_hash in hashes:
            sent[block_hash] = self._tick
            sent.move_to_end(block_hash)
        while len(sent) > self.max_blocks_per_instance:
            sent.popitem(last=False)


# -- SLO aware ---------------------------------------------------------------------------


class SloAwarePolicy(RoutingPolicy):
    """The prefill (or colocated) instance with the lowest predicted TTFT; decode as
    least_loaded. `chunk_tokens`: the prompt tokens an instance computes per step (None:
    what the instance reports, else 512). See predict_ttft for the model."""

    def __init__(
        self,
        chunk_tokens: int | None = None,
        fallback_step_model: StepTimeModel = DEFAULT_STEP_TIME_MODEL,
        prefill_weight: float = 0.1,
    ) -> None:
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1 (or None), got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens
        self.fallback_step_model = fallback_step_model
        self._least_loaded = LeastLoadedPolicy(prefill_weight)

    def predict_ttft(self, request: RouteRequest, candidate: Candidate) -> float | None:
        """Seconds until the request's first token on the candidate; None if its load is
        unknown. The queued prompt tokens and this prompt are computed in steps of the
        instance's token budget, of which a colocated instance's running requests take one
        token each; each step costs what the instance's step-time model says."""
        load = candidate.load
        if load is None:
            return None
        budget = self.chunk_tokens or load.max_num_batched_tokens or DEFAULT_CHUNK_TOKENS
        num_decodes = min(load.num_running, budget - 1) if load.role is Role.COLOCATED else 0
        per_step = budget - num_decodes
        num_tokens = load.num_queued_prefill_tokens + request.num_prompt_tokens
        num_full, rest = divmod(num_tokens, per_step)
        model = candidate.step_model or self.fallback_step_model
        seconds = num_full * model.predict(budget, num_decodes + 1)
        if rest:
            seconds += model.predict(rest + num_decodes, num_decodes + 1)
        return seconds

    def _choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> Route:
        pools = _pools(candidates)
        if pools[Role.PREFILL] and pools[Role.DECODE]:
            prefill, ttft = self._pick(request, pools[Role.PREFILL])
            decode_id = self._least_loaded.pick_decode(pools[Role.DECODE])
            return Route(decode_id=decode_id, prefill_id=prefill.instance_id, predicted_ttft_s=ttft)
        if pools[Role.COLOCATED]:
            colocated, ttft = self._pick(request, pools[Role.COLOCATED])
            return Route(decode_id=colocated.instance_id, predicted_ttft_s=ttft)
        raise NoInstanceError(_missing(candidates))

    def _pick(self, request: RouteRequest, pool: list[Candidate]) -> tuple[Candidate, float | None]:
        predictions: list[tuple[float, int, int]] = []
        for i, candidate in enumerate(pool):
            ttft = self.predict_ttft(request, candidate)
            if ttft is None:
                return self._least_loaded.pick_prompt_pool(pool), None
            predictions.append((ttft, candidate.num_in_flight, i))
        ttft, _, index = min(predictions)
        return pool[index], ttft


POLICIES: dict[str, type[RoutingPolicy]] = {
    "round_robin": RoundRobinPolicy,
    "least_loaded": LeastLoadedPolicy,
    "prefix_aware": PrefixAwarePolicy,
    "slo_aware": SloAwarePolicy,
}


def make_policy(name: str, **options: Any) -> RoutingPolicy:
    """The policy registered as `name`, made with `options` (its constructor's keywords)."""
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"routing policy {name!r} has no option {', '.join(unknown)}; "
            f"its options are: {', '.join(accepted) or 'none'}"
        )
    return cls(**options)
