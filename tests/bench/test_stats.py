"""The serving benchmark's statistics against hand-computed cases."""

from __future__ import annotations

import itertools
import math

import pytest

from benchmarks.serving.arrivals import arrival_times
from benchmarks.serving.run import parse_slo
from benchmarks.serving.stats import (
    RequestResult,
    Slo,
    attainment,
    goodput,
    percentile,
    summarize,
)

STRICT = {"sharegpt": Slo(ttft=1.0, tpot=0.1)}


def served(ttft: float, latency: float, tokens: int, kind: str = "sharegpt") -> RequestResult:
    return RequestResult(
        prompt_len=10, kind=kind, success=True, status=200, ttft=ttft, latency=latency,
        output_len=tokens,
    )  # fmt: skip


def rejected() -> RequestResult:
    return RequestResult(prompt_len=10, status=429, error="too many requests")


def test_percentiles_interpolate_between_closest_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5  # halfway between ranks 1 and 2
    assert percentile(values, 90) == pytest.approx(3.7)  # position 2.7
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="within"):
        percentile(values, 101)


def test_tpot_is_the_time_after_the_first_token_over_the_tokens_after_it() -> None:
    assert served(ttft=0.5, latency=2.5, tokens=21).tpot == pytest.approx(0.1)
    assert served(ttft=0.5, latency=0.5, tokens=1).tpot is None  # one token has no TPOT
    assert rejected().tpot is None


def test_attainment_counts_rejected_and_failed_requests_as_misses() -> None:
    results = [
        served(0.5, 0.5 + 9 * 0.05, 10),  # meets both
        served(1.5, 1.5 + 9 * 0.05, 10),  # late first token
        served(0.5, 0.5 + 9 * 0.2, 10),  # slow tokens
        served(0.2, 0.2, 1),  # one token: TPOT does not apply
        rejected(),
        RequestResult(prompt_len=10, status=200, error="connection reset"),
    ]
    reached = attainment(results, STRICT)
    assert reached["ttft"] == pytest.approx(3 / 6)
    assert reached["tpot"] == pytest.approx(3 / 6)  # first, second and the one-token answer
    assert reached["both"] == pytest.approx(2 / 6)


def test_each_kind_is_judged_by_its_own_slo() -> None:
    slos = {"sharegpt": Slo(1.0, 0.1), "long": Slo(4.0, 0.1)}
    results = [served(3.0, 3.0 + 9 * 0.05, 10, "long"), served(3.0, 3.0 + 9 * 0.05, 10)]
    assert attainment(results, slos)["both"] == pytest.approx(0.5)


def test_goodput_interpolates_where_attainment_crosses_ninety_percent() -> None:
    # 1.0 at 1 req/s, 0.95 at 2, 0.75 at 3: crosses 0.9 a quarter of the way to 3.
    crossing = goodput([(3.0, 0.75), (1.0, 1.0), (2.0, 0.95)])
    assert crossing["bound"] == "exact" and crossing["rate"] == pytest.approx(2.25)
    # Exactly at the target counts as meeting it.
    assert goodput([(1.0, 0.9), (2.0, 0.5)]) == {"rate": 1.0, "bound": "exact"}
    assert goodput([(1.0, 1.0), (2.0, 0.92)]) == {"rate": 2.0, "bound": "at_least"}
    assert goodput([(1.0, 0.8), (2.0, 0.5)]) == {"rate": 0.0, "bound": "below"}
    # A dip and recovery: the first crossing counts.
    assert goodput([(1, 1.0), (2, 0.8), (3, 0.95)])["rate"] == pytest.approx(1.5)


def test_summary_uses_vllm_key_names_and_counts_rejections() -> None:
    results = [served(0.5, 0.5 + 9 * 0.05, 10), served(1.5, 1.5 + 9 * 0.05, 10), rejected()]
    results[0].itls = [0.05] * 9
    summary = summarize(results, duration=2.0, settings={"strict": STRICT})
    assert summary["completed"] == 2 and summary["failed"] == 1 and summary["rejected"] == 1
    assert summary["total_output_tokens"] == 20
    assert summary["request_throughput"] == pytest.approx(1.0)
    assert summary["request_goodput"] == pytest.approx(0.5)  # one of three met both, in 2 s
    assert summary["median_ttft_ms"] == pytest.approx(1000.0)
    assert summary["p99_ttft_ms"] == pytest.approx(500 + 0.99 * 1000)
    assert summary["mean_tpot_ms"] == pytest.approx(50.0)
    assert summary["median_itl_ms"] == pytest.approx(50.0)
    assert summary["slo_attainment"]["strict"]["both"] == pytest.approx(1 / 3)
    for key in ("mean_e2el_ms", "std_ttft_ms", "p90_tpot_ms", "output_throughput"):
        assert key in summary


def test_arrivals_are_reproducible_and_average_the_rate() -> None:
    first = arrival_times(4000, rate=5.0, seed=3)
    assert first == arrival_times(4000, rate=5.0, seed=3)
    assert first != arrival_times(4000, rate=5.0, seed=4)
    assert first[0] == 0.0 and all(b >= a for a, b in itertools.pairwise(first))
    assert 3999 / first[-1] == pytest.approx(5.0, rel=0.05)
    bursty = arrival_times(4000, rate=5.0, burstiness=0.25, seed=3)
    gaps = [b - a for a, b in itertools.pairwise(bursty)]
    mean = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert cv == pytest.approx(2.0, rel=0.1)  # gamma shape k: coefficient of variation 1/sqrt(k)


def test_slo_settings_parse_and_bad_ones_say_what_to_write() -> None:
    name, slos = parse_slo("tight=sharegpt:0.5:0.05,long:2:0.08")
    assert name == "tight"
    assert slos == {"sharegpt": Slo(0.5, 0.05), "long": Slo(2.0, 0.08)}
    with pytest.raises(ValueError, match="NAME=KIND:TTFT_S:TPOT_S"):
        parse_slo("sharegpt:1")
