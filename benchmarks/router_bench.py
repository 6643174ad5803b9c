"""The router by itself: how many requests and streamed tokens one router process
carries, and the latency it adds, with workers that emit tokens at a fixed pace.

Processes: paced_worker.py (a prefill and a decode instance, no model), `python -m
router` pinned to its own core, and this script as the client, on the other core.
Clients speak plain HTTP/1.1 with keep-alive to /v1/completions (streaming), or the
gRPC API's GenerateStream.

Phases, each for --seconds:
  requests  closed loop, --concurrency clients, 4 output tokens each: requests/s
  tokens    closed loop, --stream-concurrency clients, 256 output tokens: tokens/s
  latency   Poisson arrivals at each --latency-rates, 16 output tokens: the latency the
            router adds to each token, (client received) - (worker sent), both read
            from CLOCK_MONOTONIC; p50 and p99, first tokens and all tokens

Per router process means per core of router CPU: the router's CPU seconds over the
phase are read from /proc, and requests (tokens) per CPU second are reported with
the wall-clock rates. When the router's core is busy the whole phase, the two agree;
when the client's core is the bottleneck, the per-CPU-second figure is the capacity.

    python benchmarks/router_bench.py [--api http|grpc|both] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import RESULTS_DIR, load_average, machine_info, write_json
from router_clients import GrpcClient, HttpClient, Sample, StampedHttpClient

from benchmarks.serving.systems import free_port

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"requests_per_s": 2000, "tokens_per_s": 50000, "p99_added_ms": 2.0}


# ---- load ------------------------------------------------------------------------------------


async def closed_loop(clients: list[Any], max_tokens: int, seconds: float) -> list[Sample]:
    """Each client sends its next request as soon as the last one ends."""
    samples: list[Sample] = []
    deadline = time.monotonic() + seconds

    async def run(client: Any) -> None:
        while time.monotonic() < deadline:
            samples.append(await client.complete(max_tokens))

    await asyncio.gather(*(run(c) for c in clients))
    return samples


async def open_loop(make_client: Any, rate: float, max_tokens: int, seconds: float) -> list[Sample]:
    """Poisson arrivals at `rate` per second; idle connections are reused."""
    rng = random.Random(0)
    idle: list[Any] = []
    samples: list[Sample] = []
    tasks = []

    async def one() -> None:
        client = idle.pop() if idle else make_client()
        samples.append(await client.complete(max_tokens))
        idle.append(client)

    start = time.monotonic()
    arrival = start
    while arrival < start + seconds:
        arrival += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, arrival - time.monotonic()))
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    for client in idle:
        client.close()
    return samples


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measured(router_pid: int, load: Any) -> tuple[list[Sample], float, float]:
    cpu, started = cpu_seconds(router_pid), time.monotonic()
    samples = await load
    return samples, time.monotonic() - started, cpu_seconds(router_pid) - cpu


def rates(samples: list[Sample], wall_s: float, cpu_s: float) -> dict[str, Any]:
    ok = [s for s in samples if s.status == 200]
    tokens = sum(len(s.arrivals) for s in ok)
    return {
        "requests": len(samples),
        "failed": len(samples) - len(ok),
        "wall_s": round(wall_s, 2),
        "router_cpu_s": round(cpu_s, 2),
        "router_cpu_busy": round(cpu_s / wall_s, 3),
        "requests_per_s": round(len(ok) / wall_s, 1),
        "tokens_per_s": round(tokens / wall_s, 1),
        "requests_per_router_cpu_s": round(len(ok) / cpu_s, 1) if cpu_s else None,
        "tokens_per_router_cpu_s": round(tokens / cpu_s, 1) if cpu_s else None,
    }


def added_latency(samples: list[Sample], sent: dict[str, list[float]]) -> dict[str, Any]:
    """Per token, (arrival) - (the worker's send); with kernel stamps, also what the
    client process saw, (read by the client) - (sent), as `client_seen`."""
    first, every, seen = [], [], []
    for sample in samples:
        times = sent.get(sample.request_id)
        if sample.status != 200 or not times or len(times) != len(sample.arrivals):
            continue
        delays = [(a - s) * 1000 for a, s in zip(sample.arrivals, times)]
        first.append(delays[0])
        every.extend(delays)
        seen.extend((a - s) * 1000 for a, s in zip(sample.seen, times))

    def percentiles(ms: list[float]) -> dict[str, float]:
        if len(ms) < 2:
            return {}
        cuts = statistics.quantiles(ms, n=100)
        return {"p50_ms": round(cuts[49], 3), "p99_ms": round(cuts[98], 3), "n": len(ms)}

    added = {"first_token": percentiles(first), "every_token": percentiles(every)}
    if seen:
        added["client_seen"] = percentiles(seen)
    return added


# ---- processes -------------------------------------------------------------------------------


def start(command: list[str], cpus: str, log: Path, ready: str | None = None) -> subprocess.Popen:
    """`command` on `cpus`, its output in `log`; with `ready`, once it has printed that."""
    process = subprocess.Popen(
        ["taskset", "-c", cpus, *command], cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    while ready is not None and ready not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{command[:3]} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    return process


async def wait_ready(port: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /ready HTTP/1.1\r\nHost: router\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            writer.close()
            if b" 200 " in head:
                return
        except OSError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError("the router did not become ready")


async def run_api(args: argparse.Namespace, api: str) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="router-bench-"))
    times_file = scratch / "sent.json"
    prefill_port, decode_port, http_port, grpc_port = (free_port() for _ in range(4))
    python = sys.executable
    workers = start(
        [python, "benchmarks/paced_worker.py", "--prefill-port", str(prefill_port),
         "--decode-port", str(decode_port), "--first-token-ms", str(args.first_token_ms),
         "--step-ms", str(args.step_ms), "--times-file", str(times_file)],
        args.client_cpus,
        scratch / "workers.log",
        ready="ready",
    )  # fmt: skip
    router = start(
        [python, "-m", "router", "--workers", f"127.0.0.1:{prefill_port},127.0.0.1:{decode_port}",
         "--http-port", str(http_port), "--grpc-port", str(grpc_port),
         "--max-in-flight", "100000", "--max-waiting-prompt-tokens", "100000000"],
        args.router_cpus,
        scratch / "router.log",
    )  # fmt: skip
    port = http_port if api == "http" else grpc_port
    client_class = HttpClient if api == "http" else GrpcClient
    stamped_class = StampedHttpClient if api == "http" else GrpcClient
    try:
        await wait_ready(http_port)
        warm = [client_class(port) for _ in range(16)]
        await closed_loop(warm, 4, 2.0)
        result: dict[str, Any] = {}
        clients = [client_class(port) for _ in range(args.concurrency)]
        samples, wall, cpu = await measured(router.pid, closed_loop(clients, 4, args.seconds))
        result["requests"] = {
            "concurrency": args.concurrency,
            "max_tokens": 4,
            **rates(samples, wall, cpu),
        }
        print(api, "requests", result["requests"], flush=True)
        streams = [client_class(port) for _ in range(args.stream_concurrency)]
        samples, wall, cpu = await measured(router.pid, closed_loop(streams, 256, args.seconds))
        result["tokens"] = {
            "concurrency": args.stream_concurrency, "max_tokens": 256, **rates(samples, wall, cpu)
        }  # fmt: skip
        print(api, "tokens", result["tokens"], flush=True)
        for client in clients + streams + warm:
            client.close()
        runs = []
        for rate in args.latency_rates:
            samples, wall, cpu = await measured(
                router.pid, open_loop(lambda: stamped_class(port), rate, 16, args.seconds)
            )
            runs.append(
                (rate, samples, {"rate": rate, "max_tokens": 16, **rates(samples, wall, cpu)})
            )
    finally:
        for process in (router, workers):  # the workers write the send times as they stop
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                raise
    sent = json.loads(times_file.read_text())["sent"]
    shutil.rmtree(scratch)
    result["latency"] = []
    for _, samples, figures in runs:
        result["latency"].append({**figures, "added": added_latency(samples, sent)})
        print(api, "latency", result["latency"][-1], flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", choices=["http", "grpc", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--stream-concurrency", type=int, default=512)
    parser.add_argument("--latency-rates", type=float, nargs="+", default=[50.0, 200.0])
    parser.add_argument("--first-token-ms", type=float, default=5.0)
    parser.add_argument("--step-ms", type=float, default=10.0)
    parser.add_argument("--router-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "router.json")
    args = parser.parse_args()
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "load_average_before": load_average(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "targets": TARGETS,
    }
    for api in ["http", "grpc"] if args.api == "both" else [args.api]:
        results[api] = asyncio.run(run_api(args, api))
    results["load_average_after"] = load_average()
    write_json(args.out, results)


if __name__ == "__main__":
    main()
