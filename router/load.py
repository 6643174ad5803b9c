"""What the router knows about each instance's load, from the workers' Status replies.

Plain Python (no gRPC calls, no asyncio, no torch) so policies can be tested alone.
The router polls every instance's Status and feeds each reply to a LoadTracker:

    Status reply ──update()──▶ InstanceLoad (as reported) + StepTimeModel (fitted)
    on_dispatch() ─▶ pending adjustment (this router's requests the reply cannot show)
    on_finish() / next update() ─▶ the adjustment is dropped
    current(now) ─▶ reported + pending, or None when unknown or stale

Staleness: a load reported more than `max_age_s` seconds before `now` is treated as
unknown (`current()` returns None), and policies then fall back to the router's own
in-flight counts. An instance's step-time model outlives staleness: step costs
change slowly, queues change fast.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

DEFAULT_MAX_AGE_S = 5.0
MIN_SAMPLES_TO_FIT = 4


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


def parse_role(value: str, instance_id: str = "") -> Role:
    try:
        return Role(value)
    except ValueError:
        known = ", ".join(r.value for r in Role)
        raise ValueError(
            f"instance {instance_id!r} reports role {value!r}; a worker must be one of: {known}"
        ) from None


@dataclass(frozen=True)
class InstanceLoad:
    """One instance's load as its Status reported it at `updated_at` (router clock, s).

    Prefix-cache counters are cumulative, in tokens: queries are prompt tokens looked up,
    hits the tokens found cached. 0 for a limit means the worker did not report it.
    """

    instance_id: str
    role: Role
    num_queued_prefill_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    updated_at: float = 0.0
    max_num_batched_tokens: int = 0
    max_num_seqs: int = 0

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV blocks in use, in [0, 1]; 0 when the size is unknown."""
        if self.num_blocks <= 0:
            return 0.0
        return min(1.0, max(0.0, 1.0 - self.num_free_blocks / self.num_blocks))

    @property
    def prefix_cache_hit_rate(self) -> float:
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )

    @classmethod
    def from_status(cls, status: Any, now: float) -> InstanceLoad:
        """From a worker_pb2.InstanceStatus received at `now`. Raises ValueError for an
        unknown role."""
        return cls(
            instance_id=status.instance_id,
            role=parse_role(status.role, status.instance_id),
            num_queued_prefill_tokens=status.num_queued_prefill_tokens,
            num_running=status.num_running,
            # Reserved requests (KV arriving) will run here soon: they count as waiting.
            num_waiting=status.num_waiting + status.num_reserved,
            num_free_blocks=status.num_free_blocks,
            num_blocks=status.num_blocks,
            prefix_cache_queries=status.prefix_cache_queries,
            prefix_cache_hits=status.prefix_cache_hits,
            updated_at=now,
            max_num_batched_tokens=status.max_num_batched_tokens,
            max_num_seqs=status.max_num_seqs,
        )


@dataclass(frozen=True)
class StepSample:
    """One engine step as a worker reported it (worker_pb2.StepSample)."""

    num_batched_tokens: int
    num_seqs: int
    seconds: float


@dataclass(frozen=True)
class StepTimeModel:
    """seconds of one engine step = base_s + per_token_s * tokens + per_seq_s * seqs.

    `fit()` solves the least squares on an instance's recent steps. With too few steps,
    or steps that do not pin a coefficient down (all of one size, or noise that makes a
    slope negative), it drops the terms it cannot fit, down to `fallback`.
    """

    base_s: float
    per_token_s: float
    per_seq_s: float = 0.0
    num_samples: int = 0  # 0: not fitted (a default)

    def predict(self, num_tokens: int, num_seqs: int = 1) -> float:
        return self.base_s + self.per_token_s * num_tokens + self.per_seq_s * num_seqs

    @classmethod
    def fit(
        cls,
        samples: Iterable[StepSample],
        fallback: StepTimeModel | None = None,
        min_samples: int = MIN_SAMPLES_TO_FIT,
    ) -> StepTimeModel:
        fallback = fallback or DEFAULT_STEP_TIME_MODEL
        usable = [s for s in samples if s.num_batched_tokens > 0 and s.seconds > 0]
        if len(usable) < max(min_samples, 2):
            return fallback
        tokens = [float(s.num_batched_tokens) for s in usable]
        seqs = [float(s.num_seqs) for s in usable]
        seconds = [s.seconds for s in usable]
        for fit in (_fit_tokens_and_seqs, _fit_tokens):
            model = fit(tokens, seqs, seconds)
            if model is not None:
                return model
        # Every step had the same size: keep the fallback's slope, move its intercept.
        mean_t, mean_y = _mean(tokens), _mean(seconds)
        base = max(0.0, mean_y - fallback.per_token_s * mean_t)
        return cls(base, (mean_y - base) / mean_t, 0.0, len(usable))


DEFAULT_STEP_TIME_MODEL = StepTimeModel(base_s=0.02, per_token_s=2e-4)
"""A guess (a small model on a CPU) until an instance has reported MIN_SAMPLES_TO_FIT steps."""


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _centered(xs: Sequence[float]) -> list[float]:
    mean = _mean(xs)
    return [x - mean for x in xs]


def _dot(xs: Sequence[float], ys: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(xs, ys))


def _fit_tokens_and_seqs(
    tokens: Sequence[float], seqs: Sequence[float], seconds: Sequence[float]
) -> StepTimeModel | None:
    t, s, y = _centered(tokens), _centered(seqs), _centered(seconds)
    stt, sss, sts = _dot(t, t), _dot(s, s), _dot(t, s)
    det = stt * sss - sts * sts
    if stt <= 0 or sss <= 0 or det <= 1e-9 * stt * sss:  # seqs constant or tied to tokens
        return None
    sty, ssy = _dot(t, y), _dot(s, y)
    per_token = (sss * sty - sts * ssy) / det
    per_seq = (stt * ssy - sts * sty) / det
    base = _mean(seconds) - per_token * _mean(tokens) - per_seq * _mean(seqs)
    if min(per_token, per_seq, base) < 0:
        return None
    return StepTimeModel(base, per_token, per_seq, len(tokens))


def _fit_tokens(
    tokens: Sequence[float], seqs: Sequence[float], seconds: Sequence[float]
) -> StepTimeModel | None:
    t, y = _centered(tokens), _centered(seconds)
    stt = _dot(t, t)
    if stt <= 0:
        return None
    per_token = _dot(t, y) / stt
    base = _mean(seconds) - per_token * _mean(tokens)
    if per_token < 0:
        return None
    if base < 0:  # through the origin instead: no negative time for small steps
        per_token, base = _dot(tokens, seconds) / _dot(tokens, tokens), 0.0
    return StepTimeModel(base, per_token, 0.0, len(tokens))


@dataclass
class _Dispatch:
    num_prompt_tokens: int
    dispatched_at: float


@dataclass
class _Entry:
    load: InstanceLoad
    step_model: StepTimeModel


class LoadTracker:
    """The latest load and fitted step-time model of each instance, plus the requests this
    router dispatched since (which the reported load may not show yet).

    Times are the caller's clock (e.g. time.monotonic()), the same for every call.
    `update()` takes `now` = when the Status call was *sent*: dispatches before it are
    assumed to be in the reply, later ones stay as adjustments until the next reply
    or their `on_finish()`.
    """

    def __init__(
        self,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        fallback_step_model: StepTimeModel = DEFAULT_STEP_TIME_MODEL,
        min_samples: int = MIN_SAMPLES_TO_FIT,
    ) -> None:
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be > 0, got {max_age_s}")
        self.max_age_s = max_age_s
        self.fallback_step_model = fallback_step_model
        self.min_samples = min_samples
        self._entries: dict[str, _Entry] = {}
        self._pending: dict[str, dict[str, _Dispatch]] = {}  # instance -> request -> dispatch

    def update(self, instance_id: str, status: Any, now: float) -> InstanceLoad:
        """Records a worker_pb2.InstanceStatus. Raises ValueError if it is another
        instance's, or names an unknown role."""
        if status.instance_id and status.instance_id != instance_id:
            raise ValueError(
                f"a Status reply for instance {instance_id!r} names {status.instance_id!r}; "
                "two workers may share an address"
            )
        load = replace(InstanceLoad.from_status(status, now), instance_id=instance_id)
        samples = [
            StepSample(s.num_batched_tokens, s.num_seqs, s.seconds) for s in status.step_samples
        ]
        model = StepTimeModel.fit(samples, self.fallback_step_model, self.min_samples)
        self._entries[instance_id] = _Entry(load, model)
        pending = self._pending.get(instance_id, {})
        for request_id in [r for r, d in pending.items() if d.dispatched_at <= now]:
            del pending[request_id]
        return load

    def forget(self, instance_id: str) -> None:
        """Drops everything known about the instance (it left, or restarted)."""
        self._entries.pop(instance_id, None)
        self._pending.pop(instance_id, None)

    def get(self, instance_id: str) -> InstanceLoad | None:
        """The latest reported load, as reported (no adjustments, however old)."""
        entry = self._entries.get(instance_id)
        return entry.load if entry is not None else None

    def step_model(self, instance_id: str) -> StepTimeModel | None:
        """The instance's fitted step-time model; None if it never reported."""
        entry = self._entries.get(instance_id)
        return entry.step_model if entry is not None else None

    def current(self, instance_id: str, now: float) -> InstanceLoad | None:
        """The load a policy should use: reported plus this router's pending dispatches
        (prompt tokens queued on a prefill or colocated instance, one request more on a
        decode instance); None when unknown or older than max_age_s."""
        entry = self._entries.get(instance_id)
        if entry is None or now - entry.load.updated_at > self.max_age_s:
            return None
        pending = self._pending.get(instance_id)
        if not pending:
            return entry.load
        load = entry.load
        if load.role is Role.DECODE:
            return replace(load, num_waiting=load.num_waiting + len(pending))
        num_tokens = sum(d.num_prompt_tokens for d in pending.values())
        return replace(
            load,
            num_queued_prefill_tokens=load.num_queued_prefill_tokens + num_tokens,
            num_waiting=load.num_waiting + len(pending),
        )

    def on_dispatch(
        self, instance_id: str, request_id: str, num_prompt_tokens: int, now: float
    ) -> None:
        """The router sent request `request_id` to the instance at `now`."""
        self._pending.setdefault(instance_id, {})[request_id] = _Dispatch(num_prompt_tokens, now)

    def on_finish(self, instance_id: str, request_id: str) -> None:
        """The instance is done with the request's prompt (first token, handoff, or end);
        unknown ids are ignored."""
        self._pending.get(instance_id, {}).pop(request_id, None)

    def num_pending(self, instance_id: str) -> int:
        return len(self._pending.get(instance_id, {}))
