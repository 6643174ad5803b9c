"""What the migration scheduler does for a deliberately unbalanced load.

`tandem serve` with one prefill and two decode instances (local processes, one torch
thread each, on the same cores) and round-robin routing. The requests alternate long
and short outputs, so round robin sends every long request to one decode instance
and every short one to the other: one instance ends up decoding a big batch while
the other idles. The same request list, with the same arrival times, runs with the
migration scheduler off and on (`--migration-policy balance`), alternating, so both
see the same machine:

    TPOT      per request: (last token - first token) / (tokens - 1); its P50 and P99
    gap P99   the 99th percentile of every gap between two tokens of any request
    goodput   requests per second that met both SLOs (TTFT and TPOT)
    moves     migrations the scheduler committed, and how many it aborted

    cd benchmarks && ../.venv/bin/python balance_bench.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from bench_common import (
    RESULTS_DIR,
    load_average,
    machine_info,
    random_prompts,
    warn_if_busy,
    write_json,
)
from migration_bench import TimedStream
from serving.systems import Server, free_port


def workload(args: argparse.Namespace) -> list[tuple[float, list[int], int]]:
    """(arrival offset in seconds, prompt, max tokens): long and short outputs in turn,
    Poisson arrivals at args.rate."""
    rng = random.Random(args.seed)
    prompts = random_prompts(args.requests, args.prompt_len, 49152, seed=args.seed)
    offsets = itertools.accumulate(rng.expovariate(args.rate) for _ in prompts)
    lengths = itertools.cycle([args.long_output, args.short_output])
    return [(t, p, n) for t, p, n in zip(offsets, prompts, lengths)]


def run_once(url: str, requests: list[tuple[float, list[int], int]]) -> list[TimedStream]:
    started = time.perf_counter()
    streams = []
    for offset, prompt, max_tokens in requests:
        time.sleep(max(0.0, started + offset - time.perf_counter()))
        streams.append(TimedStream(url, prompt, max_tokens))
    for stream in streams:
        stream.thread.join()
    return streams


def summarize(
    streams: list[TimedStream], requests: list[tuple[float, list[int], int]], args: Any
) -> dict[str, Any]:
    complete = [s for s, r in zip(streams, requests) if not s.error and len(s.arrivals) == r[2]]
    ttft = [s.arrivals[0] - s.sent for s in complete]
    tpot = [_tpot(s) for s in complete]
    token_gaps = [b - a for s in complete for a, b in itertools.pairwise(s.arrivals)]
    ttft_slo, tpot_slo = args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3
    good = sum(t <= ttft_slo and p <= tpot_slo for t, p in zip(ttft, tpot))
    duration = max(s.arrivals[-1] for s in complete) - min(s.sent for s in streams)
    return {
        "completed": len(complete),
        "failed": len(streams) - len(complete),
        "duration_s": duration,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": statistics.median(tpot),
        "tpot_p99_s": percentile(tpot, 99),
        "gap_p99_s": percentile(token_gaps, 99),
        "goodput_rps": good / duration,
        "num_good": good,
        "per_request": [  # arrival order: (max tokens, TTFT s, TPOT s), None if it failed
            [r[2], *((s.arrivals[0] - s.sent, _tpot(s)) if s in complete else (None, None))]
            for s, r in zip(streams, requests)
        ],
    }


def _tpot(stream: TimedStream) -> float:
    return (stream.arrivals[-1] - stream.arrivals[0]) / (len(stream.arrivals) - 1)


def pooled(runs: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """TPOT percentiles over every completed request of every round, by output length."""
    by_length: dict[int, list[float]] = {}
    for run in runs:
        for max_tokens, _, tpot in run["per_request"]:
            if tpot is not None:
                by_length.setdefault(max_tokens, []).append(tpot)
    return {n: {f"p{q}": percentile(v, q) for q in (50, 90, 99)} for n, v in by_length.items()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def migrations(url: str) -> dict[str, float]:
    """tandem:migrations_total by outcome, from the router's metrics."""
    counts: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("tandem:migrations_total{"):
            labels, value = line.rsplit(" ", 1)
            outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = counts.get(outcome, 0.0) + float(value)
    return counts


def start_server(args: argparse.Namespace, policy: str, log: Path) -> Server:
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "tandem"), "serve", "--launcher", "local",
        "--decode-instances", "2", "--dtype", args.dtype, "--policy", "round_robin",
        "--http-port", str(port), "--grpc-port", str(free_port()),
        "--kv-cache-gb", str(args.kv_cache_gb), "--migration-policy", policy,
        "--migration-interval", str(args.interval), "--migration-threshold", str(args.threshold),
    ]  # fmt: skip
    server = Server(f"tandem-1p2d-{policy}", command, port)
    server.start("0-1", log)
    server.wait_ready(log)
    return server


def measure(args: argparse.Namespace, policy: str, requests: list[Any]) -> dict[str, Any]:
    log = args.out.with_name(f"balance-{policy}.log")
    server = start_server(args, policy, log)
    try:
        run_once(server.base_url, requests[:4])  # warm up: KV links, kernels
        before = migrations(server.base_url)
        streams = run_once(server.base_url, requests)
        after = migrations(server.base_url)
    finally:
        server.stop()
    moves = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}
    return {**summarize(streams, requests, args), "migrations": moves}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rate", type=float, default=1.5, help="requests per second")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--long-output", type=int, default=192)
    parser.add_argument("--short-output", type=int, default=16)
    parser.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    parser.add_argument("--tpot-slo-ms", type=float, default=150.0)
    parser.add_argument("--kv-cache-gb", type=float, default=0.03)
    parser.add_argument("--interval", type=float, default=1.0, help="scheduler period, s")
    parser.add_argument("--threshold", type=float, default=0.05, help="load gap worth a move")
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "balance.json")
    args = parser.parse_args()
    warn_if_busy()
    load_before = load_average()
    requests = workload(args)
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "balance": []}
    for _ in range(args.rounds):
        for policy in runs:
            runs[policy].append(measure(args, policy, requests))
            print(policy, runs[policy][-1], flush=True)
    keys = ("tpot_p50_s", "tpot_p99_s", "gap_p99_s", "ttft_p99_s", "goodput_rps", "duration_s")
    medians = {p: {k: statistics.median(r[k] for r in rs) for k in keys} for p, rs in runs.items()}
    print(f"{'scheduler':>10} {'TPOT p50':>9} {'TPOT p99':>9} {'gap p99':>8} {'TTFT p99':>9} "
          f"{'goodput':>9} {'duration':>9}")  # fmt: skip
    for policy, m in medians.items():
        print(
            f"{policy:>10} {m['tpot_p50_s'] * 1e3:>7.1f}ms {m['tpot_p99_s'] * 1e3:>7.1f}ms "
            f"{m['gap_p99_s'] * 1e3:>6.1f}ms {m['ttft_p99_s']:>8.2f}s "
            f"{m['goodput_rps']:>6.2f}r/s {m['duration_s']:>8.1f}s"
        )
    print("TPOT of every request of every round, by output length:")
    pooled_tpot = {p: pooled(rs) for p, rs in runs.items()}
    for policy, by_length in pooled_tpot.items():
        for length, row in by_length.items():
            print(
                f"{policy:>10} {length:>4} tokens: p50 {row['p50'] * 1e3:.0f}ms "
                f"p90 {row['p90'] * 1e3:.0f}ms p99 {row['p99'] * 1e3:.0f}ms"
            )
    off, on = medians["off"], medians["balance"]
    print(
        f"balance/off: TPOT p99 x{on['tpot_p99_s'] / off['tpot_p99_s']:.2f}, "
        f"goodput x{on['goodput_rps'] / max(off['goodput_rps'], 1e-9):.2f}"
    )
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "median": medians,
            "pooled_tpot_s": pooled_tpot,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
