"""The serving benchmark's statistics: percentiles, SLO attainment and goodput.

Every request that was sent counts: a rejected or failed request meets no SLO.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)
GOODPUT_ATTAINMENT = 0.9


@dataclass
class RequestResult:
    """What the client saw of one request. Times are seconds from its send."""

    prompt_len: int
    kind: str = "sharegpt"
    success: bool = False
    status: int = 0
    error: str = ""
    ttft: float | None = None
    latency: float | None = None  # end to end: send to last token
    output_len: int = 0
    itls: list[float] = field(default_factory=list)  # gaps between streamed chunks
    text: str = ""

    @property
    def tpot(self) -> float | None:
        """(time of last token - time of first token) / (tokens - 1); None below 2 tokens."""
        if not self.success or self.output_len < 2 or self.ttft is None or self.latency is None:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


@dataclass(frozen=True)
class Slo:
    """Targets in seconds: time to first token and time per output token."""

    ttft: float
    tpot: float

    def meets(self, result: RequestResult) -> tuple[bool, bool]:
        """(TTFT met, TPOT met). A failed request meets neither; a one-token answer has
        no TPOT and meets that target."""
        if not result.success or result.ttft is None:
            return False, False
        tpot = result.tpot
        return result.ttft <= self.ttft, tpot is None or tpot <= self.tpot


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks,
    as numpy's default; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def attainment(results: Sequence[RequestResult], slos: dict[str, Slo]) -> dict[str, float]:
    """Fractions of all requests meeting the TTFT target, the TPOT target, and both;
    each request is judged by the SLO of its kind."""
    if not results:
        return {"ttft": math.nan, "tpot": math.nan, "both": math.nan}
    met = [slos[r.kind].meets(r) for r in results]
    n = len(results)
    return {
        "ttft": sum(t for t, _ in met) / n,
        "tpot": sum(p for _, p in met) / n,
        "both": sum(t and p for t, p in met) / n,
    }


def goodput(points: Sequence[tuple[float, float]], target: float = GOODPUT_ATTAINMENT) -> dict:
    """The request rate at which `target` of the requests meet their SLO, from
    (rate, attainment) points of a sweep: linear interpolation between the last rate
    that meets the target and the next one, which does not.

    Returns {"rate": r, "bound": b}: b is "exact" when the crossing lies within the
    sweep, "at_least" when every rate met the target (r is the highest swept), and
    "below" when the lowest rate already missed it (r is 0 and the sweep should start
    lower)."""
    ordered = sorted(points)
    if not ordered:
        raise ValueError("goodput needs at least one (rate, attainment) point")
    if ordered[0][1] < target:
        return {"rate": 0.0, "bound": "below"}
    for (rate, value), (next_rate, next_value) in itertools.pairwise(ordered):
        if value >= target > next_value:
            fraction = (value - target) / (value - next_value)
            return {"rate": rate + fraction * (next_rate - rate), "bound": "exact"}
    if ordered[-1][1] >= target:
        return {"rate": ordered[-1][0], "bound": "at_least"}
    raise AssertionError("unreachable")  # pragma: no cover


def latency_summary(name: str, values_s: Sequence[float]) -> dict[str, float]:
    """vLLM's keys for one latency: mean_, median_, std_ and pNN_ `name`_ms."""
    ms = [v * 1000 for v in values_s]
    mean = sum(ms) / len(ms) if ms else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / len(ms)) if ms else math.nan
    summary = {
        f"mean_{name}_ms": mean,
        f"median_{name}_ms": percentile(ms, 50),
        f"std_{name}_ms": std,
    }
    for q in PERCENTILES:
        summary[f"p{q}_{name}_ms"] = percentile(ms, q)
    return summary


SloSet = dict[str, Slo]  # request kind -> its SLO


def summarize(
    results: Sequence[RequestResult], duration: float, settings: dict[str, SloSet]
) -> dict[str, Any]:
    """One run's figures, with the key names of `vllm bench serve` where it has them,
    and SLO attainment under each named setting (request_goodput uses the first).
    `duration`: seconds from the first send to the last response."""
    done = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_len for r in done)
    first = next(iter(settings.values()))
    good = sum(1 for r in results if all(first[r.kind].meets(r)))

    def per_second(count: float) -> float:
        return count / duration if duration > 0 else math.nan

    summary: dict[str, Any] = {
        "duration": duration,
        "num_prompts": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "rejected": sum(1 for r in results if r.status == 429),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": per_second(len(done)),
        "request_goodput": per_second(good),
        "output_throughput": per_second(output_tokens),
        "total_token_throughput": per_second(input_tokens + output_tokens),
        "slo_attainment": {name: attainment(results, slos) for name, slos in settings.items()},
    }
    summary.update(latency_summary("ttft", [r.ttft for r in done if r.ttft is not None]))
    summary.update(latency_summary("tpot", [t for r in done if (t := r.tpot) is not None]))
    summary.update(latency_summary("itl", [gap for r in done for gap in r.itls]))
    summary.update(latency_summary("e2el", [r.latency for r in done if r.latency is not None]))
    return summary
