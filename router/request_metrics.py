"""One request's metrics at the router, from its arrival to its end (RequestMetrics),
and the request metric families it writes to (RequestInstruments). RouterMetrics, in
router.metrics, makes one RequestInstruments and hands out a RequestMetrics per request:

    request_started ─▶ dispatched ─▶ tokens ─▶ tokens ... ─▶ finished
          └─────────────────────────────────────────────────▶ rejected

The first finished() or rejected() ends it; later calls change nothing. Each end is
also recorded in the SLO windows (router.slo), by the request's slo_class.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from router.slo import SLOWindows

C = TypeVar("C", "LoopHistogram", "LoopCounter")

REJECT_REASONS = ("overloaded", "not_ready", "invalid_request", "unauthenticated", "no_instance")
SUCCESS_REASONS = ("stop", "length", "abort")

# vLLM's buckets (vllm/v1/metrics/loggers.py), so that quantiles compare.
# fmt: off
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
TOKEN_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)
# fmt: on


def token_buckets(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value, as vLLM buckets token counts."""
    buckets: list[float] = []
    base = 1
    while base <= max_value:
        buckets += [base * m for m in (1, 2, 5) if base * m <= max_value]
        base *= 10
    return tuple(buckets)


class LoopHistogram:
    """A Prometheus histogram for the per-token path: plain counts, no lock, one bisect
    per observation (prometheus_client's Histogram takes a lock and walks its buckets).
    Written only from the router's event loop; exposed as a histogram when scraped."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = list(buckets)
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """`count` observations of `value`."""
        self.counts[bisect_left(self.bounds, value)] += count  # bucket le >= value
        self.sum += value * count

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation)
        buckets, cumulative = [], 0
        for bound, count in zip([*map(floatToGoString, self.bounds), "+Inf"], self.counts):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric([], buckets, self.sum)
        yield family


class LoopCounter:
    """A Prometheus counter for the per-token path, as LoopHistogram is a histogram."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation = name, documentation
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value)


@dataclass(frozen=True)
class RequestInstruments:
    """What RequestMetrics writes to; made once per RouterMetrics."""

    queue_time: Histogram
    ttft: Histogram
    inter_token_latency: LoopHistogram
    time_per_output_token: Histogram
    e2e_latency: Histogram
    request_prompt_tokens: Histogram
    request_generation_tokens: Histogram
    prompt_tokens: Counter
    prompt_tokens_cached: Counter
    generation_tokens: LoopCounter
    success: Counter
    failed: Counter
    rejected: Counter

    @classmethod
    def register(cls, registry: CollectorRegistry, max_model_len: int) -> RequestInstruments:
        """The request metric families, registered in `registry` (once per registry)."""

        def histogram(name: str, help_: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, help_, buckets=buckets, registry=registry)

        def counter(name: str, help_: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, help_, labels, registry=registry)

        def loop_collector(collector: C) -> C:
            registry.register(collector)
            return collector

        success = counter(
            "tandem:request_success", "Requests finished, by reason.", ("finished_reason",)
        )
        rejected = counter("tandem:requests_rejected", "Requests refused, by reason.", ("reason",))
        for reason in SUCCESS_REASONS:
            success.labels(reason)  # so that their rates start at 0, not absent
        for reason in REJECT_REASONS:
            rejected.labels(reason)
        return cls(
            queue_time=histogram(
                "tandem:request_queue_time_seconds",
                "Time from arrival at the router to dispatch to a worker.",
                REQUEST_LATENCY_BUCKETS,
            ),
            ttft=histogram(
                "tandem:time_to_first_token_seconds",
                "Time from arrival at the router to the first token.",
                TTFT_BUCKETS,
            ),
            inter_token_latency=loop_collector(
                LoopHistogram(
                    "tandem:inter_token_latency_seconds",
                    "Time between output tokens, per token after the first.",
                    TOKEN_LATENCY_BUCKETS,
                )
            ),
            time_per_output_token=histogram(
                "tandem:request_time_per_output_token_seconds",
                "Per request: (time of last token - time of first) / (output tokens - 1).",
                TOKEN_LATENCY_BUCKETS,
            ),
            e2e_latency=histogram(
                "tandem:e2e_request_latency_seconds",
                "Time from arrival at the router to the end of the request.",
                REQUEST_LATENCY_BUCKETS,
            ),
            request_prompt_tokens=histogram(
                "tandem:request_prompt_tokens",
                "Prompt tokens per finished request.",
                token_buckets(max_model_len),
            ),
            request_generation_tokens=histogram(
                "tandem:request_generation_tokens",
                "Output tokens per finished request.",
                token_buckets(max_model_len),
            ),
            prompt_tokens=counter("tandem:prompt_tokens", "Prompt tokens of finished requests."),
            prompt_tokens_cached=counter(
                "tandem:prompt_tokens_cached", "Prompt tokens found in a prefix cache."
            ),
            generation_tokens=loop_collector(
                LoopCounter("tandem:generation_tokens", "Output tokens streamed.")
            ),
            success=success,
            failed=counter("tandem:requests_failed", "Requests that ended with an error."),
            rejected=rejected,
        )


class RequestMetrics:
    """One request's timings, from its arrival at the router to its end. Made by
    RouterMetrics.request_started; see the module docstring for the order of calls."""

    def __init__(
        self,
        instruments: RequestInstruments,
        slo_windows: SLOWindows,
        clock: Callable[[], float],
        slo_class: str,
        arrival: float,
    ) -> None:
        self.slo_class = slo_class
        self.arrival = arrival
        self.dispatch_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_output_tokens = 0
        self.ended = False
        self._instruments = instruments
        self._slo_windows = slo_windows
        self._clock = clock

    def dispatched(self, now: float | None = None) -> None:
        """The request was sent to a worker: observes its queue time (once)."""
        if self.ended or self.dispatch_time is not None:
            return
        self.dispatch_time = self._now(now)
        self._instruments.queue_time.observe(self.dispatch_time - self.arrival)

    def tokens(self, num_tokens: int, now: float | None = None) -> None:
        """num_tokens new output tokens arrived. The first of the first call's tokens gives
        TTFT; every later token gets an inter-token latency: its share of the time since
        the previous call (0 for the others of the first call). So the latencies of a
        request sum to last − first, and their mean is its TPOT."""
        if self.ended or num_tokens <= 0:
            return
        now = self._now(now)
        instruments = self._instruments
        if self.last_token_time is None:
            self.first_token_time = now
            instruments.ttft.observe(now - self.arrival)
            if num_tokens > 1:
                instruments.inter_token_latency.observe(0.0, num_tokens - 1)
        else:
            latency = (now - self.last_token_time) / num_tokens
            instruments.inter_token_latency.observe(latency, num_tokens)
        instruments.generation_tokens.inc(num_tokens)
        self.last_token_time = now
        self.num_output_tokens += num_tokens

    def finished(
        self,
        finish_reason: str,
        num_prompt_tokens: int,
        num_cached_tokens: int = 0,
        now: float | None = None,
    ) -> None:
        """The request ended with finish_reason ("stop", "length", "abort" or "error"):
        observes its end-to-end latency, TPOT and token counts, and judges its SLO."""
        if self.ended:
            return
        self.ended = True
        now = self._now(now)
        instruments = self._instruments
        instruments.e2e_latency.observe(now - self.arrival)
        instruments.prompt_tokens.inc(num_prompt_tokens)
        instruments.prompt_tokens_cached.inc(num_cached_tokens)
        instruments.request_prompt_tokens.observe(num_prompt_tokens)
        instruments.request_generation_tokens.observe(self.num_output_tokens)
        tpot = self.time_per_output_token
        if tpot is not None:
            instruments.time_per_output_token.observe(tpot)
        if finish_reason == "error":
            instruments.failed.inc()
            self._slo_windows.record(self.slo_class, now, ttft=None, tpot=None)
            return
        instruments.success.labels(finish_reason).inc()
        self._slo_windows.record(self.slo_class, now, self.time_to_first_token, tpot)

    def rejected(self, reason: str, now: float | None = None) -> None:
        """The request was refused before a worker served it (e.g. "no_instance",
        "overloaded"): counts the rejection, and a miss of both SLO targets."""
        if self.ended:
            return
        self.ended = True
        self._instruments.rejected.labels(reason).inc()
        self._slo_windows.record(self.slo_class, self._now(now), ttft=None, tpot=None)

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival

    @property
    def time_per_output_token(self) -> float | None:
        """(last − first) / (n − 1); None before the second token."""
        first, last = self.first_token_time, self.last_token_time
        if self.num_output_tokens < 2 or first is None or last is None:
            return None
        return (last - first) / (self.num_output_tokens - 1)

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now
