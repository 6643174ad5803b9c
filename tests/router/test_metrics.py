"""RouterMetrics driven with explicit times, read back the way Prometheus reads /metrics."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import SLO, RouterMetrics

MODEL = "tiny-echo@0123abcd"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: RouterMetrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; every series carries model_name, so it is added here."""
    key = (name, frozenset({"model_name": MODEL, **labels}.items()))
    assert key in samples, f"no sample {name}{labels}; have {sorted(n for n, _ in samples)}"
    return samples[key]


def has_series(samples: Samples, name: str, **labels: str) -> bool:
    return (name, frozenset({"model_name": MODEL, **labels}.items())) in samples


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics(clock: FakeClock) -> RouterMetrics:
    slos = {
        "default": SLO(ttft_s=1.0, tpot_s=0.1, window_s=60.0),
        "batch": SLO(ttft_s=10.0, tpot_s=1.0, window_s=60.0),
    }
    return RouterMetrics(slos, model_name=MODEL, clock=clock)


def test_a_requests_latencies_land_in_the_histograms(metrics: RouterMetrics) -> None:
    request = metrics.request_started(now=0.0)
    request.dispatched(now=0.25)  # queue time 0.25
    request.tokens(1, now=0.5)  # TTFT 0.5
    request.tokens(2, now=0.7)  # two tokens, 0.1 each
    request.tokens(1, now=1.0)  # 0.3
    request.finished("stop", num_prompt_tokens=6, num_cached_tokens=4, now=1.5)

    s = scrape(metrics)
    assert value(s, "tandem:request_queue_time_seconds_count") == 1
    assert value(s, "tandem:request_queue_time_seconds_sum") == pytest.approx(0.25)
    assert value(s, "tandem:time_to_first_token_seconds_count") == 1
    assert value(s, "tandem:time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert value(s, "tandem:time_to_first_token_seconds_bucket", le="0.25") == 0
    assert value(s, "tandem:time_to_first_token_seconds_bucket", le="0.5") == 1
    # One inter-token latency per token after the first: 0.1, 0.1, 0.3.
    assert value(s, "tandem:inter_token_latency_seconds_count") == 3
    assert value(s, "tandem:inter_token_latency_seconds_sum") == pytest.approx(0.5)
    assert value(s, "tandem:inter_token_latency_seconds_bucket", le="0.1") == 2
    # TPOT = (1.0 - 0.5) / (4 - 1)
    assert value(s, "tandem:request_time_per_output_token_seconds_count") == 1
    assert value(s, "tandem:request_time_per_output_token_seconds_sum") == pytest.approx(0.5 / 3)
    assert value(s, "tandem:e2e_request_latency_seconds_count") == 1
    assert value(s, "tandem:e2e_request_latency_seconds_sum") == pytest.approx(1.5)
    assert value(s, "tandem:request_prompt_tokens_sum") == 6
    assert value(s, "tandem:request_generation_tokens_sum") == 4
    assert value(s, "tandem:request_generation_tokens_bucket", le="5.0") == 1
    assert value(s, "tandem:request_generation_tokens_bucket", le="2.0") == 0


def test_several_tokens_in_the_first_delta_arrive_with_no_gap(metrics: RouterMetrics) -> None:
    request = metrics.request_started(now=0.0)
    request.tokens(3, now=0.2)
    request.tokens(0, now=0.3)  # the finishing delta often has no tokens
    request.finished("length", num_prompt_tokens=2, now=0.3)

    s = scrape(metrics)
    assert value(s, "tandem:time_to_first_token_seconds_count") == 1
    assert value(s, "tandem:inter_token_latency_seconds_count") == 2
    assert value(s, "tandem:inter_token_latency_seconds_sum") == 0
    assert value(s, "tandem:generation_tokens_total") == 3


def test_token_counters_and_requests_by_finish_reason(metrics: RouterMetrics) -> None:
    for reason, num_prompt, num_cached, num_output in [
        ("stop", 10, 0, 3),
        ("stop", 20, 16, 1),
        ("length", 5, 0, 2),
        ("error", 7, 0, 1),
    ]:
        request = metrics.request_started(now=0.0)
        request.tokens(num_output, now=0.1)
        request.finished(reason, num_prompt, num_cached, now=0.2)
        request.finished("stop", 1000, 1000, now=0.3)  # a second end changes nothing

    s = scrape(metrics)
    assert value(s, "tandem:prompt_tokens_total") == 42
    assert value(s, "tandem:prompt_tokens_cached_total") == 16
    assert value(s, "tandem:generation_tokens_total") == 7
    assert value(s, "tandem:request_success_total", finished_reason="stop") == 2
    assert value(s, "tandem:request_success_total", finished_reason="length") == 1
    assert value(s, "tandem:request_success_total", finished_reason="abort") == 0
    assert not has_series(s, "tandem:request_success_total", finished_reason="error")
    assert value(s, "tandem:requests_failed_total") == 1
    assert value(s, "tandem:e2e_request_latency_seconds_count") == 4


def test_rejections_are_counted_by_reason(metrics: RouterMetrics) -> None:
    metrics.rejected("invalid_request")
    metrics.rejected("invalid_request")
    metrics.rejected("overloaded", slo_class="default")
    metrics.request_started().rejected("no_instance")

    s = scrape(metrics)
    assert value(s, "tandem:requests_rejected_total", reason="invalid_request") == 2
    assert value(s, "tandem:requests_rejected_total", reason="overloaded") == 1
    assert value(s, "tandem:requests_rejected_total", reason="no_instance") == 1
    assert value(s, "tandem:requests_rejected_total", reason="unauthenticated") == 0
    # The two rejected with a class are misses; the invalid ones are not judged.
    assert metrics.attainment("default") == {
        "num_requests": 2,
        "ttft": 0.0,
        "tpot": 0.0,
        "both": 0.0,
    }


def _serve(
    metrics: RouterMetrics, slo_class: str, start: float, ttft: float, tpot: float, n: int = 5
) -> None:
    """One request of n tokens, first after ttft, then evenly tpot apart."""
    request = metrics.request_started(slo_class, now=start)
    request.dispatched(now=start)
    for i in range(n):
        request.tokens(1, now=start + ttft + i * tpot)
    request.finished("stop", num_prompt_tokens=4, now=start + ttft + (n - 1) * tpot)


def test_slo_attainment_is_the_fraction_met_over_the_window(
    metrics: RouterMetrics, clock: FakeClock
) -> None:
    _serve(metrics, "default", start=0.0, ttft=0.5, tpot=0.05)  # meets both; ends at 0.7
    _serve(metrics, "default", start=30.0, ttft=2.0, tpot=0.05)  # TTFT miss
    _serve(metrics, "default", start=40.0, ttft=0.5, tpot=0.2)  # TPOT miss
    _serve(metrics, "default", start=50.0, ttft=0.2, tpot=0.01)  # meets both
    _serve(metrics, "batch", start=50.0, ttft=5.0, tpot=0.5)  # meets the looser targets

    clock.now = 55.0
    s = scrape(metrics)
    assert value(s, "tandem:slo_num_requests", slo_class="default") == 4
    assert value(s, "tandem:slo_ttft_attainment", slo_class="default") == 0.75
    assert value(s, "tandem:slo_tpot_attainment", slo_class="default") == 0.75
    assert value(s, "tandem:slo_attainment", slo_class="default") == 0.5
    assert value(s, "tandem:slo_attainment", slo_class="batch") == 1.0

    clock.now = 61.0  # the first request (ended at 0.7) has left the 60 s window
    s = scrape(metrics)
    assert value(s, "tandem:slo_num_requests", slo_class="default") == 3
    assert value(s, "tandem:slo_attainment", slo_class="default") == pytest.approx(1 / 3)
    assert metrics.attainment("default") == {
        "num_requests": 3,
        "ttft": pytest.approx(2 / 3),
        "tpot": pytest.approx(2 / 3),
        "both": pytest.approx(1 / 3),
    }

    clock.now = 200.0  # all gone: the fractions are left out, the count is 0
    s = scrape(metrics)
    assert value(s, "tandem:slo_num_requests", slo_class="default") == 0
    assert not has_series(s, "tandem:slo_attainment", slo_class="default")
    assert not has_series(s, "tandem:slo_ttft_attainment", slo_class="default")
    assert metrics.attainment("default")["both"] is None


def test_failed_silent_and_one_token_requests_are_judged(metrics: RouterMetrics) -> None:
    _serve(metrics, "default", start=0.0, ttft=0.5, tpot=0.0, n=1)  # one token: TPOT met
    no_token = metrics.request_started(now=0.0)
    no_token.finished("abort", num_prompt_tokens=4, now=0.5)  # aborted before a token
    failed = metrics.request_started(now=0.0)
    failed.tokens(1, now=0.1)
    failed.finished("error", num_prompt_tokens=4, now=0.2)  # fast, but it failed
    metrics.request_started("unconfigured", now=0.0).finished("stop", 4, now=0.1)

    result = metrics.attainment("default", now=1.0)
    assert result == {"num_requests": 3, "ttft": 1 / 3, "tpot": 1 / 3, "both": 1 / 3}
    with pytest.raises(ValueError, match="unknown SLO class 'unconfigured'"):
        metrics.attainment("unconfigured")


def test_instance_gauges_are_per_instance_and_role(metrics: RouterMetrics) -> None:
    metrics.observe_instance("p0", "prefill", 1, 4, 0.25, 100, 40)
    metrics.observe_instance("d0", "decode", 7, 0, 0.5, 0, 0)
    metrics.observe_instance("p0", "prefill", 2, 3, 0.75, 150, 60)

    s = scrape(metrics)
    p0, d0 = {"instance": "p0", "role": "prefill"}, {"instance": "d0", "role": "decode"}
    assert value(s, "tandem:num_requests_running", **p0) == 2
    assert value(s, "tandem:num_requests_waiting", **p0) == 3
    assert value(s, "tandem:kv_cache_usage_perc", **p0) == 0.75
    assert value(s, "tandem:num_requests_running", **d0) == 7
    assert value(s, "tandem:kv_cache_usage_perc", **d0) == 0.5
    assert value(s, "tandem:prefix_cache_queries_total", **p0) == 150
    assert value(s, "tandem:prefix_cache_hits_total", **p0) == 60
    with pytest.raises(ValueError, match=r"0\.\.1"):
        metrics.observe_instance("d0", "decode", 7, 0, 1.5, 0, 0)


def test_prefix_cache_counters_never_go_back_when_a_worker_restarts(
    metrics: RouterMetrics,
) -> None:
    labels = {"instance": "p0", "role": "prefill"}
    metrics.observe_instance("p0", "prefill", 0, 0, 0.0, 100, 40)
    metrics.observe_instance("p0", "prefill", 0, 0, 0.0, 120, 50)
    metrics.observe_instance("p0", "prefill", 0, 0, 0.0, 30, 10)  # restarted: from zero
    s = scrape(metrics)
    assert value(s, "tandem:prefix_cache_queries_total", **labels) == 150
    assert value(s, "tandem:prefix_cache_hits_total", **labels) == 60

    metrics.observe_instance("p0", "prefill", 0, 0, 0.0, 35, 10)
    s = scrape(metrics)
    assert value(s, "tandem:prefix_cache_queries_total", **labels) == 155
    assert value(s, "tandem:prefix_cache_hits_total", **labels) == 60


def test_forget_instance_removes_only_its_series(metrics: RouterMetrics) -> None:
    metrics.observe_instance("p0", "prefill", 1, 1, 0.5, 10, 5)
    metrics.observe_instance("d0", "decode", 2, 0, 0.5, 0, 0)
    metrics.forget_instance("p0")
    metrics.forget_instance("never-seen")

    s = scrape(metrics)
    assert not any(dict(labels).get("instance") == "p0" for _, labels in s)
    assert value(s, "tandem:num_requests_running", instance="d0", role="decode") == 2

    metrics.observe_instance("p0", "prefill", 0, 0, 0.0, 3, 1)  # back: counts from scratch
    s = scrape(metrics)
    assert value(s, "tandem:prefix_cache_queries_total", instance="p0", role="prefill") == 3


def test_kv_transfers_add_up(metrics: RouterMetrics) -> None:
    metrics.kv_transfer(1 << 20, 0.02)
    metrics.kv_transfer(3 << 20, 0.2)

    s = scrape(metrics)
    assert value(s, "tandem:kv_transfer_bytes_total") == 4 << 20
    assert value(s, "tandem:kv_transfer_seconds_total") == pytest.approx(0.22)
    assert value(s, "tandem:kv_handoff_duration_seconds_count") == 2
    assert value(s, "tandem:kv_handoff_duration_seconds_bucket", le="0.025") == 1
    assert value(s, "tandem:kv_handoff_duration_seconds_bucket", le="0.25") == 2


def test_router_queue_gauges_show_the_last_value(metrics: RouterMetrics) -> None:
    metrics.set_router_queue(num_in_flight=5, num_queued=2)
    metrics.set_router_queue(num_in_flight=3, num_queued=1)

    s = scrape(metrics)
    assert value(s, "tandem:router_num_requests_in_flight") == 3
    assert value(s, "tandem:router_num_requests_queued") == 1


def test_every_series_carries_the_model_name_and_none_is_a_created_timestamp(
    clock: FakeClock,
) -> None:
    metrics = RouterMetrics(clock=clock)
    metrics.rejected("not_ready")  # before the model is known
    metrics.set_model_name(MODEL)
    metrics.kv_transfer(1, 0.1)

    s = scrape(metrics)
    assert s, "render() gave no samples"
    assert all(dict(labels).get("model_name") == MODEL for _, labels in s)
    assert not any(name.endswith("_created") for name, _ in s)
    assert value(s, "tandem:requests_rejected_total", reason="not_ready") == 1


def test_two_routers_do_not_share_series(clock: FakeClock) -> None:
    first, second = RouterMetrics(model_name=MODEL), RouterMetrics(model_name=MODEL)
    first.kv_transfer(10, 0.1)
    assert value(scrape(first), "tandem:kv_transfer_bytes_total") == 10
    assert value(scrape(second), "tandem:kv_transfer_bytes_total") == 0


@pytest.mark.parametrize("field", ["ttft_s", "tpot_s", "window_s"])
def test_an_slo_target_must_be_positive(field: str) -> None:
    targets = {"ttft_s": 1.0, "tpot_s": 0.1, "window_s": 60.0, field: 0.0}
    with pytest.raises(ValueError, match=rf"SLO\.{field} must be > 0"):
        SLO(**targets)
