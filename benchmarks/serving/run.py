"""Runs a workload against one OpenAI-compatible server at one or more request rates.

Each rate gets one arrival schedule (from the seed), sent open-loop: a request goes at
its time whether or not earlier ones have finished. A request still running
`max_request_s` after its send is cancelled and counted as failed; with the default
(70 s) such a request misses every SLO here anyway, since even a first token inside
4 s leaves over 66 s for at most 255 more tokens: a TPOT above 250 ms.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from tqdm import tqdm

from benchmarks.serving.arrivals import arrival_times
from benchmarks.serving.client import send
from benchmarks.serving.stats import RequestResult, Slo, SloSet, goodput, summarize
from benchmarks.serving.workloads import BenchRequest

STRICT = Slo(ttft=1.0, tpot=0.100)
RELAXED = Slo(ttft=2.5, tpot=0.250)
LONG = Slo(ttft=4.0, tpot=0.100)
# Per workload, the SLO settings its results are judged by: name -> kind -> SLO. In
# the mix, ShareGPT requests are judged by the ShareGPT SLO, long ones by the long one.
DEFAULT_SLOS: dict[str, dict[str, SloSet]] = {
    "sharegpt": {"strict": {"sharegpt": STRICT}, "relaxed": {"sharegpt": RELAXED}},
    "long": {"long": {"long": LONG}},
    "mix": {
        "strict": {"sharegpt": STRICT, "long": LONG},
        "relaxed": {"sharegpt": RELAXED, "long": LONG},
    },
}
DEFAULT_MAX_REQUEST_S = 70.0


def parse_slo(text: str) -> tuple[str, SloSet]:
    """'NAME=KIND:TTFT_S:TPOT_S[,KIND:TTFT_S:TPOT_S...]', e.g.
    'strict=sharegpt:1:0.1,long:4:0.1'."""
    name, sep, rest = text.partition("=")
    slos: SloSet = {}
    try:
        if not sep or not name:
            raise ValueError
        for part in rest.split(","):
            kind, ttft, tpot = part.split(":")
            slos[kind] = Slo(float(ttft), float(tpot))
    except ValueError:
        raise ValueError(
            f"--slo {text!r}: expected NAME=KIND:TTFT_S:TPOT_S[,...], e.g. strict=sharegpt:1:0.1"
        ) from None
    return name, slos


@dataclass
class Point:
    """One rate's run: its summary (vLLM's keys) and the per-request results."""

    summary: dict[str, Any]
    results: list[RequestResult]

    def raw(self) -> dict[str, Any]:
        """The per-request lists `vllm bench serve` saves with its results."""
        return {
            "input_lens": [r.prompt_len for r in self.results],
            "output_lens": [r.output_len for r in self.results],
            "ttfts": [r.ttft for r in self.results],
            "itls": [r.itls for r in self.results],
            "generated_texts": [r.text for r in self.results],
            "errors": [r.error for r in self.results],
            "kinds": [r.kind for r in self.results],
        }


async def model_id(base_url: str) -> str:
    """The first model the server lists at /v1/models."""
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(f"{base_url}/v1/models")
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])


async def run_point(
    base_url: str,
    requests: Sequence[BenchRequest],
    rate: float,
    settings: dict[str, SloSet],
    *,
    seed: int = 0,
    burstiness: float = 1.0,
    ignore_eos: bool = True,
    max_request_s: float = DEFAULT_MAX_REQUEST_S,
    label: str = "",
    model: str | None = None,
) -> Point:
    """Sends `requests` at `rate` per second (Poisson, or gamma with `burstiness`)."""
    model = model or await model_id(base_url)
    url = f"{base_url}/v1/completions"
    arrivals = arrival_times(len(requests), rate, burstiness, seed)
    load_before = os.getloadavg()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(None, connect=30.0)
    bar = tqdm(total=len(requests), desc=label or f"{rate:g} req/s", leave=False, file=sys.stderr)

    async def timed(request: BenchRequest) -> RequestResult:
        try:
            return await asyncio.wait_for(
                send(client, url, model, request, ignore_eos), max_request_s
            )
        except asyncio.TimeoutError:
            return RequestResult(
                prompt_len=request.prompt_len,
                kind=request.kind,
                error=f"cancelled after {max_request_s:g} s (it misses every SLO)",
            )
        finally:
            bar.update(1)

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()
        tasks = []
        for request, at in zip(requests, arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(timed(request)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    bar.close()
    summary: dict[str, Any] = {
        "date": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai",
        "endpoint": "/v1/completions",
        "label": label,
        "model_id": model,
        "tokenizer_id": model,
        "request_rate": rate,
        "burstiness": burstiness,
        "max_concurrency": None,
        "seed": seed,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    summary.update(summarize(results, duration, settings))
    return Point(summary, results)


def sweep_summary(points: Sequence[Point], settings: dict[str, SloSet]) -> dict[str, Any]:
    """Goodput under each SLO setting, from the points' attainment of both targets."""
    return {
        name: goodput(
            [(p.summary["request_rate"], p.summary["slo_attainment"][name]["both"]) for p in points]
        )
        for name in settings
    }


def print_table(title: str, points: Sequence[Point], out: Callable[[str], None] = print) -> None:
    """A one-screen summary of a sweep."""
    names = list(points[0].summary["slo_attainment"]) if points else []
    out(title)
    header = f"{'rate':>6} {'done':>5} {'fail':>4} {'TTFT p50/p99 ms':>17} {'TPOT p50/p99 ms':>16}"
    out(header + "".join(f" {n + ' ok':>12}" for n in names) + "  load")
    for point in points:
        s = point.summary
        line = (
            f"{s['request_rate']:>6g} {s['completed']:>5} {s['failed']:>4} "
            f"{s['median_ttft_ms']:>8.0f}/{s['p99_ttft_ms']:<8.0f} "
            f"{s['median_tpot_ms']:>7.1f}/{s['p99_tpot_ms']:<8.1f}"
        )
        line += "".join(f" {s['slo_attainment'][n]['both']:>12.0%}" for n in names)
        out(line + f"  {s['load_average_before'][0]:.2f}")
