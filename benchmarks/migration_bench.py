"""What a live migration costs a running request, against stop-and-copy and recompute.

`tandem serve` with one prefill and two decode instances (local processes, one torch
thread each, on the same cores). For each context length, a request streams with
`ignore_eos`; once it has 16 tokens, the router's admin API migrates it to the other
decode instance, and the stream's token arrival times are kept:

    live       blocks copied in stages while the request decodes; paused for the
               last blocks and its tokens (the default)
    blocking   stop and copy: paused for the whole copy
    recompute  what re-prefilling the context on the destination would pause it for:
               the TTFT of a fresh prompt as long as the context (no prefix cache)

For live and blocking:
    downtime   paused at the source until committed at the destination (the worker's
               figure), and the client's longest gap between two tokens around the
               migration against the median gap before it (one decode step)
    total      the migration from the admin call to commit; stages; KV bytes
    slowdown   the median gap between tokens while the source copied (live only)
               against the median before the migration

    cd benchmarks && ../.venv/bin/python migration_bench.py [--contexts 256 512 1024 2048]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
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
from serving.client import sse_lines_sync
from serving.systems import Server, free_port

TOKENS_BEFORE = 16


class TimedStream:
    """A streamed completion read on a thread, with each token's arrival time."""

    def __init__(self, url: str, prompt: list[int], max_tokens: int) -> None:
        self.body = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "return_token_ids": True,
        }
        self.url = url
        self.id = ""
        self.error = ""  # the error the stream ended with, if any
        self.sent = time.perf_counter()
        self.arrivals: list[float] = []  # one per token
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body, timeout=600) as r:
            for line in sse_lines_sync(r):
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.error = str(chunk["error"])
                        continue
                    self.id = chunk["id"]
                    now = time.perf_counter()
                    self.arrivals += [now] * len(chunk["choices"][0].get("token_ids") or [])

    def wait_tokens(self, count: int) -> None:
        while len(self.arrivals) < count:
            if not self.thread.is_alive():
                raise RuntimeError("the stream ended early")
            time.sleep(0.002)


def gaps(arrivals: list[float], start: float, end: float) -> list[float]:
    """Gaps between consecutive tokens whose later token arrived in [start, end)."""
    return [b - a for a, b in itertools.pairwise(arrivals) if start <= b < end]


def migrate_once(url: str, prompt: list[int], blocking: bool) -> dict[str, Any]:
    stream = TimedStream(url, prompt, max_tokens=TOKENS_BEFORE + 48)
    stream.wait_tokens(TOKENS_BEFORE)
    started = time.perf_counter()
    body = {"blocking": blocking}
    reply = httpx.post(f"{url}/admin/requests/{stream.id}/migrate", json=body, timeout=600)
    ended = time.perf_counter()
    reply.raise_for_status()
    (outcome,) = reply.json()["migrations"]
    if not outcome["committed"]:
        raise RuntimeError(f"the migration did not commit: {outcome}")
    stream.thread.join()
    arrivals = stream.arrivals
    before = gaps(arrivals, 0.0, started)
    paused_at = ended - outcome["downtime_s"]
    return {
        "downtime_s": outcome["downtime_s"],
        "total_s": outcome["total_s"],
        "stages": outcome["stages"],
        "kv_bytes": outcome["kv_bytes"],
        "step_s": statistics.median(before),
        "max_gap_s": max(gaps(arrivals, started, ended + 1.0)),
        "copy_gaps_s": gaps(arrivals, started, paused_at),
    }


def recompute_once(url: str, prompt: list[int]) -> float:
    """TTFT of a fresh prompt as long as the context: what re-prefilling it costs."""
    started = time.perf_counter()
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0.0}
    httpx.post(f"{url}/v1/completions", json=body, timeout=600).raise_for_status()
    return time.perf_counter() - started


def measure(url: str, context: int, repeats: int, seed: int) -> dict[str, Any]:
    prompts = random_prompts(3 * repeats, context - TOKENS_BEFORE, 49152, seed=seed + context)
    live = [migrate_once(url, prompts[i], blocking=False) for i in range(repeats)]
    blocking = [migrate_once(url, prompts[repeats + i], blocking=True) for i in range(repeats)]
    recompute = [recompute_once(url, prompts[2 * repeats + i]) for i in range(repeats)]
    copy_gaps = [g for run in live for g in run["copy_gaps_s"]]

    def median(runs: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in runs))

    step = median(live + blocking, "step_s")
    return {
        "context_tokens": context,
        "step_s": step,
        "live": {k: median(live, k) for k in ("downtime_s", "max_gap_s", "total_s", "stages")},
        "live_kv_mb": median(live, "kv_bytes") / 1e6,
        "blocking": {k: median(blocking, k) for k in ("downtime_s", "max_gap_s", "total_s")},
        "recompute_s": statistics.median(recompute),
        "source_step_during_copy_s": statistics.median(copy_gaps) if copy_gaps else None,
    }


def start_server(dtype: str, log: Path) -> Server:
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "tandem"), "serve", "--launcher", "local",
        "--decode-instances", "2", "--dtype", dtype, "--http-port", str(port),
        "--grpc-port", str(free_port()), "--kv-cache-gb", "1",
    ]  # fmt: skip
    server = Server("tandem-1p2d", command, port)
    server.start("0-1", log)
    server.wait_ready(log)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "migration.json")
    args = parser.parse_args()
    warn_if_busy()
    load_before = load_average()
    log = args.out.with_suffix(".log")
    server = start_server(args.dtype, log)
    try:
        url = server.base_url
        for _ in range(2):  # the KV link each way is made by the first migration
            migrate_once(url, random_prompts(1, 64, 49152, seed=args.seed)[0], blocking=False)
        rows = [measure(url, c, args.repeats, args.seed) for c in args.contexts]
    finally:
        server.stop()
    print(f"{'context':>8} {'step':>8} {'live down':>10} {'live gap':>9} {'stop&copy':>10} "
          f"{'recompute':>10} {'live total':>11} {'stages':>7} {'copy step':>10}")  # fmt: skip
    for r in rows:
        copy_step = r["source_step_during_copy_s"]
        print(
            f"{r['context_tokens']:>8} {r['step_s'] * 1e3:>6.1f}ms "
            f"{r['live']['downtime_s'] * 1e3:>8.1f}ms {r['live']['max_gap_s'] * 1e3:>7.1f}ms "
            f"{r['blocking']['downtime_s'] * 1e3:>8.1f}ms {r['recompute_s'] * 1e3:>8.1f}ms "
            f"{r['live']['total_s'] * 1e3:>9.1f}ms {r['live']['stages']:>7.1f} "
            + ("       n/a" if copy_step is None else f"{copy_step * 1e3:>8.1f}ms")
        )
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "dtype": args.dtype,
            "repeats": args.repeats,
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
