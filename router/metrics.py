"""The router's Prometheus metrics: one RouterMetrics per router, served at GET /metrics.

Names follow vLLM's (`vllm:` becomes `tandem:`) wherever the meaning is the same, so
vLLM dashboards work with the prefix changed. Every series carries `model_name` once
set_model_name() has been called. Each RouterMetrics has its own registry: several
routers (or tests) in one process never share a series.

Who calls what (on the router's event loop; `now` defaults to the clock given at
construction, time.monotonic, and exists so that tests can pass exact times):

    metrics = RouterMetrics(slo_classes={"default": SLO(ttft_s=1.0, tpot_s=0.1)})
    metrics.set_model_name(router.model_id)          # once the workers' Info is known

    request = metrics.request_started(slo_class)     # the request arrives
    request.dispatched()                             # sent to a worker: its queue time
    request.tokens(len(delta.token_ids))             # each delta: TTFT, then ITL
    request.finished(delta.finish_reason, delta.num_prompt_tokens, delta.num_cached_tokens)
    request.rejected("no_instance")                  # instead of finished: never served

    metrics.rejected("invalid_request")              # refused before request_started
    metrics.kv_transfer(handoff.kv_bytes, handoff.seconds)
    metrics.migration(outcome)                       # a live migration ended (MigrationOutcome)
    metrics.observe_instance(status.instance_id, status.role, status.num_running,
        status.num_waiting, 1 - status.num_free_blocks / status.num_blocks,
        status.prefix_cache_queries, status.prefix_cache_hits)   # after each Status poll
    metrics.forget_instance(instance_id)             # the worker is gone
    metrics.set_router_queue(num_in_flight, num_queued)
    body, content_type = metrics.render()            # GET /metrics

A request's tracking object, RequestMetrics, the request metrics it writes (the
table's first thirteen rows) and REJECT_REASONS are in router.request_metrics, with
the order of its calls; this module holds the registry and the other families.

| metric | type | labels | meaning |
|---|---|---|---|
| tandem:request_queue_time_seconds | histogram | | arrival at the router → dispatch |
| tandem:time_to_first_token_seconds | histogram | | arrival → first token |
| tandem:inter_token_latency_seconds | histogram | | per token after the first (see tokens) |
| tandem:request_time_per_output_token_seconds | histogram | | per request: TPOT |
| tandem:e2e_request_latency_seconds | histogram | | arrival → finished |
| tandem:request_prompt_tokens | histogram | | prompt tokens per finished request |
| tandem:request_generation_tokens | histogram | | output tokens per finished request |
| tandem:prompt_tokens_total | counter | | prompt tokens of finished requests |
| tandem:prompt_tokens_cached_total | counter | | of those, found in a prefix cache |
| tandem:generation_tokens_total | counter | | output tokens, counted as they arrive |
| tandem:request_success_total | counter | finished_reason | stop, length, abort |
| tandem:requests_failed_total | counter | | finished with finish_reason "error" |
| tandem:requests_rejected_total | counter | reason | refused: see REJECT_REASONS |
| tandem:requests_retried_total | counter | reason | resumed elsewhere: RETRY_REASONS |
| tandem:kv_transfer_bytes_total | counter | | KV bytes handed prefill → decode |
| tandem:kv_transfer_seconds_total | counter | | time spent on those handoffs |
| tandem:kv_handoff_duration_seconds | histogram | | one handoff's seconds |
| tandem:migrations_total | counter | outcome | live migrations: committed, or why not |
| tandem:migration_downtime_seconds | histogram | | paused at the source → committed |
| tandem:migration_duration_seconds | histogram | | a committed migration, all stages |
| tandem:migration_stages | histogram | | copies per committed migration |
| tandem:migration_kv_bytes_total | counter | | KV bytes moved by committed migrations |
| tandem:store_up | gauge | | 1 while the state store answers (router.membership) |
| tandem:store_errors_total | counter | | state store calls that failed or timed out |
| tandem:registry_events_total | counter | event | registered, reregistered, expired, refused |
| tandem:num_requests_running | gauge | instance, role | the worker's running requests |
| tandem:num_requests_waiting | gauge | instance, role | the worker's waiting requests |
| tandem:kv_cache_usage_perc | gauge | instance, role | used fraction of KV blocks, 0..1 |
| tandem:prefix_cache_queries_total | counter | instance, role | tokens looked up |
| tandem:prefix_cache_hits_total | counter | instance, role | tokens found |
| tandem:router_num_requests_in_flight | gauge | | requests the router is serving |
| tandem:router_num_requests_queued | gauge | | requests waiting at the router |
| tandem:slo_num_requests | gauge | slo_class | requests judged in the last window_s |
| tandem:slo_ttft_attainment | gauge | slo_class | fraction of them with TTFT <= ttft_s |
| tandem:slo_tpot_attainment | gauge | slo_class | fraction with TPOT <= tpot_s |
| tandem:slo_attainment | gauge | slo_class | fraction meeting both |

SLO attainment is computed at scrape time over the requests that ended in the last
window_s seconds; the three fractions are left out while that window is empty. As in
DistServe's goodput, failed requests (finish_reason "error"), requests that got no
token, and rejections passed with a slo_class count as misses; a request with one
token meets its TPOT target. Requests of a class that is not configured are not judged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric

from router.request_metrics import RequestInstruments, RequestMetrics
from router.slo import SLO, Attainment, SLOWindows

if TYPE_CHECKING:
    from router.migration import MigrationOutcome

# fmt: off
RETRY_REASONS = ("decode_lost", "prefill_lost", "colocated_lost")  # the lost instance's role
HANDOFF_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
# fmt: on


class _WithModelName:
    """Collects an inner registry with `model_name` on every sample, leaving out the
    `_created` samples that prometheus_client adds to counters and histograms (vLLM
    turns them off too, but with a process-wide switch)."""

    def __init__(self, inner: CollectorRegistry) -> None:
        self.model_name = ""
        self._inner = inner

    def collect(self) -> Iterator[Metric]:
        extra = {"model_name": self.model_name} if self.model_name else {}
        for family in self._inner.collect():
            created = f"{family.name}_created"
            copy = Metric(family.name, family.documentation, family.type, family.unit)
            copy.samples = [
                sample._replace(labels={**sample.labels, **extra})
                for sample in family.samples
                if sample.name != created
            ]
            yield copy


@dataclass
class _InstanceSeen:
    role: str
    prefix_cache_queries: int
    prefix_cache_hits: int


class RouterMetrics:
    """The router's metrics, in a registry of their own. See the module docstring."""

    def __init__(
        self,
        slo_classes: Mapping[str, SLO] | None = None,
        *,
        model_name: str = "",
        max_model_len: int = 1 << 17,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._inner = CollectorRegistry()
        self._labelled = _WithModelName(self._inner)
        self._labelled.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(self._labelled)
        self._slo_windows = SLOWindows(slo_classes or {}, clock)
        self._inner.register(self._slo_windows)
        self._requests = RequestInstruments.register(self._inner, max_model_len)
        self._init_kv_transfer_metrics()
        self._init_migration_metrics()
        self._init_instance_metrics()
        self._init_router_metrics()

    def add_collector(self, collector: Any) -> None:
        """Families a collector (an object with collect()) yields at each scrape."""
        self._inner.register(collector)

    def set_model_name(self, model_name: str) -> None:
        """Label every series with model_name (the router learns it from its workers)."""
        self._labelled.model_name = model_name

    # -- requests ------------------------------------------------------------------------

    def request_started(
        self, slo_class: str = "default", now: float | None = None
    ) -> RequestMetrics:
        """A request arrived at the router: the returned object tracks it to its end."""
        arrival = self._clock() if now is None else now
        return RequestMetrics(self._requests, self._slo_windows, self._clock, slo_class, arrival)

    def rejected(self, reason: str, slo_class: str | None = None, now: float | None = None) -> None:
        """A request was refused (reason: one of REJECT_REASONS, or another word). With a
        slo_class it also counts as a miss of both of that class's targets: pass it when
        the refusal is the server's doing ("overloaded", "no_instance")."""
        self._requests.rejected.labels(reason).inc()
        if slo_class is not None:
            now = self._clock() if now is None else now
            self._slo_windows.record(slo_class, now, ttft=None, tpot=None)

    def retried(self, reason: str) -> None:
        """A request was resumed on other instances after its worker was lost (reason:
        one of RETRY_REASONS)."""
        self._retried.labels(reason).inc()

    def attainment(self, slo_class: str, now: float | None = None) -> Attainment:
        """The SLO class's attainment over its window, as the gauges would show it now.
        Raises ValueError for a class that is not configured."""
        return self._slo_windows.attainment(slo_class, now)

    # -- KV handoffs ---------------------------------------------------------------------

    def kv_transfer(self, num_bytes: int, seconds: float) -> None:
        """One prefill → decode handoff moved num_bytes of KV cache in `seconds`."""
        self._kv_bytes.inc(num_bytes)
        self._kv_seconds.inc(seconds)
        self._kv_handoff.observe(seconds)

    def migration(self, outcome: MigrationOutcome) -> None:
        """A live migration ended, committed or not."""
        self._migrations.labels(outcome.abort_reason or "committed").inc()
        if outcome.committed:
            self._migration_downtime.observe(outcome.downtime_s)
            self._migration_seconds.observe(outcome.total_s)
            self._migration_stages.observe(outcome.stages)
            self._migration_bytes.inc(outcome.kv_bytes)

    # -- workers -------------------------------------------------------------------------

    def observe_instance(
        self,
        instance_id: str,
        role: str,
        num_running: int,
        num_waiting: int,
        kv_usage: float,
        prefix_cache_queries: int,
        prefix_cache_hits: int,
    ) -> None:
        """A worker's Status: its load now, and its prefix cache's cumulative totals (in
        tokens). The exported counters follow those totals; when they drop (the worker
        restarted and counts from zero again) they grow by the new totals instead."""
        if not 0.0 <= kv_usage <= 1.0:
            raise ValueError(f"kv_usage is a fraction of the KV blocks, 0..1; got {kv_usage}")
        seen = self._instances.get(instance_id)
        if seen is not None and seen.role != role:
            self.forget_instance(instance_id)
            seen = None
        if seen is None:
            seen = self._instances[instance_id] = _InstanceSeen(role, 0, 0)
        labels = (instance_id, role)
        self._num_running.labels(*labels).set(num_running)
        self._num_waiting.labels(*labels).set(num_waiting)
        self._kv_usage.labels(*labels).set(kv_usage)
        increase = _counter_increase(seen.prefix_cache_queries, prefix_cache_queries)
        self._prefix_queries.labels(*labels).inc(increase)
        increase = _counter_increase(seen.prefix_cache_hits, prefix_cache_hits)
        self._prefix_hits.labels(*labels).inc(increase)
        seen.prefix_cache_queries = prefix_cache_queries
        seen.prefix_cache_hits = prefix_cache_hits

    def forget_instance(self, instance_id: str) -> None:
        """Remove the worker's series (a no-op for a worker never observed)."""
        seen = self._instances.pop(instance_id, None)
        if seen is None:
            return
        for metric in self._per_instance:
            metric.remove(instance_id, seen.role)

    # -- the router itself ---------------------------------------------------------------

    def set_router_queue(self, num_in_flight: int, num_queued: int) -> None:
        """Requests the router is serving now, and those waiting for admission."""
        self._router_in_flight.set(num_in_flight)
        self._router_queued.set(num_queued)

    def render(self) -> tuple[bytes, str]:
        """The body and content type for GET /metrics, in Prometheus text format 0.0.4,
        which every Prometheus reads. (prometheus_client 0.26 writes OpenMetrics with the
        `:` of sample names escaped to `_` but not the family's, so it is not offered.)"""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    # -- construction --------------------------------------------------------------------

    def _init_kv_transfer_metrics(self) -> None:
        self._kv_bytes = Counter(
            "tandem:kv_transfer_bytes", "KV cache bytes handed off.", registry=self._inner
        )
        self._kv_seconds = Counter(
            "tandem:kv_transfer_seconds", "Seconds spent on KV handoffs.", registry=self._inner
        )
        self._kv_handoff = Histogram(
            "tandem:kv_handoff_duration_seconds",
            "One KV handoff: first block sent to commit acknowledged.",
            buckets=HANDOFF_BUCKETS,
            registry=self._inner,
        )

    def _init_migration_metrics(self) -> None:
        self._migrations = Counter(
            "tandem:migrations",
            "Live migrations of running requests, by outcome: committed, or why not.",
            ("outcome",),
            registry=self._inner,
        )
        self._migration_downtime = Histogram(
            "tandem:migration_downtime_seconds",
            "A committed migration's pause: the request left the source's batch until it "
            "was committed at the destination.",
            buckets=HANDOFF_BUCKETS,
            registry=self._inner,
        )
        self._migration_seconds = Histogram(
            "tandem:migration_duration_seconds",
            "A committed migration from start to commit, all stages.",
            buckets=HANDOFF_BUCKETS,
            registry=self._inner,
        )
        self._migration_stages = Histogram(
            "tandem:migration_stages",
            "Copies made by a committed migration, the paused one included.",
            buckets=(1, 2, 3, 4, 5, 6, 8),
            registry=self._inner,
        )
        self._migration_bytes = Counter(
            "tandem:migration_kv_bytes",
            "KV cache bytes moved by committed migrations.",
            registry=self._inner,
        )

    def _init_instance_metrics(self) -> None:
        labels = ("instance", "role")
        self._instances: dict[str, _InstanceSeen] = {}

        def gauge(name: str, help_: str) -> Gauge:
            return Gauge(name, help_, labels, registry=self._inner)

        def counter(name: str, help_: str) -> Counter:
            return Counter(name, help_, labels, registry=self._inner)

        self._num_running = gauge("tandem:num_requests_running", "Requests running on the worker.")
        self._num_waiting = gauge("tandem:num_requests_waiting", "Requests waiting on the worker.")
        self._kv_usage = gauge(
            "tandem:kv_cache_usage_perc", "Fraction of the worker's KV blocks in use (0..1)."
        )
        self._prefix_queries = counter(
            "tandem:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self._prefix_hits = counter(
            "tandem:prefix_cache_hits", "Prompt tokens found in the prefix cache."
        )
        self._per_instance: tuple[Gauge | Counter, ...] = (
            self._num_running,
            self._num_waiting,
            self._kv_usage,
            self._prefix_queries,
            self._prefix_hits,
        )

    def _init_router_metrics(self) -> None:
        self._retried = Counter(
            "tandem:requests_retried",
            "Requests resumed on other instances after a worker was lost.",
            ["reason"],
            registry=self._inner,
        )
        for reason in RETRY_REASONS:
            self._retried.labels(reason)
        self._router_in_flight = Gauge(
            "tandem:router_num_requests_in_flight",
            "Requests the router is serving.",
            registry=self._inner,
        )
        self._router_queued = Gauge(
            "tandem:router_num_requests_queued",
            "Requests waiting at the router for admission.",
            registry=self._inner,
        )


def _counter_increase(previous: int, current: int) -> int:
    """How much a worker's cumulative total grew; a drop means it restarted from zero."""
    return current - previous if current >= previous else current
