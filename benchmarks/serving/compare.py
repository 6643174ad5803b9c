"""`tandem bench compare`: every system started on the same cores, then the same sweep
on each, taking turns rate by rate (the order rotates), so slow drift in the shared
machine's speed falls on all systems alike. Writes under --out:

  summary.json      every point's figures (no per-request data), goodputs and ratios
  table.md          goodput per system and SLO, and tandem / vLLM
  *.png             attainment against rate; TTFT and TPOT CDFs at the headline rate
  raw/              per-point JSON with per-request data (git-ignored)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.serving import plots, workloads
from benchmarks.serving.cli import (
    DEFAULT_RATES,
    goodput_text,
    save_point,
    settings_for,
    tokenizer_for,
)
from benchmarks.serving.run import Point, print_table, run_point, sweep_summary
from benchmarks.serving.stats import SloSet
from benchmarks.serving.systems import SYSTEMS, Server, server

WARMUP_REQUESTS = 4


def compare(args: argparse.Namespace, custom: dict[str, SloSet]) -> None:
    from benchmarks.export_model import ensure_exported

    names = args.systems or list(SYSTEMS)
    rates = {w: list(DEFAULT_RATES[w]) for w in args.workloads}
    for text in args.rates:
        workload, _, values = text.partition("=")
        if workload not in rates:
            raise ValueError(f"--rates {text!r}: {workload!r} is not among --workloads")
        rates[workload] = [float(v) for v in values.split(",")]
    headline_workload, _, headline_rate = args.headline.partition("=")
    model_dir = ensure_exported()
    tokenizer = tokenizer_for(model_dir)
    conversations = workloads.sharegpt_conversations()
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="tandem-bench-"))
    servers = [server(n, model_dir, args.dtype, args.cpus, args.vllm_venv) for n in names]
    report: dict[str, Any] = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "machine": _machine(),
        "systems": {s.name: s.command for s in servers},
        "workloads": {},
    }
    try:
        for s in servers:  # one at a time: start-up is the heaviest part of each
            print(f"starting {s.name} (log {logs / s.name}.log)", flush=True)
            s.start(args.cpus, logs / f"{s.name}.log")
            s.wait_ready(logs / f"{s.name}.log")
        warm = workloads.build("mix", tokenizer, WARMUP_REQUESTS, 1234, conversations)
        for s in servers:
            asyncio.run(
                run_point(
                    s.base_url, warm, 10.0, settings_for("mix", {}), label=f"warm-up {s.name}"
                )
            )
        for workload in args.workloads:
            settings = settings_for(workload, custom)
            lists = {
                rate: workloads.build(
                    workload, tokenizer, args.num_prompts,
                    workloads.point_seed(args.seed, rate), conversations,
                )
                for rate in rates[workload]
            }  # fmt: skip
            points = _sweep(servers, lists, settings, args, workload)
            report["workloads"][workload] = _workload_report(points, settings, rates[workload])
            _plot(args.out, workload, points, settings)
            _write(args.out, report)
            if workload == headline_workload and headline_rate:  # the other seeds, next
                report["headline"] = _headline(
                    servers,
                    tokenizer,
                    conversations,
                    headline_workload,
                    float(headline_rate),
                    rates[workload],
                    args,
                    custom,
                )
                _write(args.out, report)
    finally:
        for s in servers:
            s.stop()
    print(f"results: {args.out} (server logs: {logs})")


def _sweep(
    servers: list[Server],
    lists: dict[float, list[workloads.BenchRequest]],
    settings: dict[str, SloSet],
    args: argparse.Namespace,
    workload: str,
) -> dict[str, list[Point]]:
    """Each rate's own request list, on every system in turn (the order rotates)."""
    points: dict[str, list[Point]] = {s.name: [] for s in servers}
    for turn, (rate, requests) in enumerate(lists.items()):
        for s in servers[turn % len(servers) :] + servers[: turn % len(servers)]:
            point = _measure(s, requests, rate, settings, args.seed, args, workload)
            points[s.name].append(point)
    for name, series in points.items():
        series.sort(key=lambda p: p.summary["request_rate"])
        print_table(f"== {name}, {workload}", series)
    return points


def _workload_report(
    points: dict[str, list[Point]], settings: dict[str, SloSet], rates: list[float]
) -> dict[str, Any]:
    goodputs = {name: sweep_summary(series, settings) for name, series in points.items()}
    ratios: dict[str, dict[str, float | None]] = {}
    if "vllm" in goodputs:
        for name, by_slo in goodputs.items():
            if name == "vllm":
                continue
            ratios[name] = {}
            for slo, value in by_slo.items():
                peer = goodputs["vllm"][slo]["rate"]
                ratios[name][slo] = value["rate"] / peer if peer > 0 else None
    return {
        "rates": rates,
        "slos": {n: {k: [s.ttft, s.tpot] for k, s in v.items()} for n, v in settings.items()},
        "goodput": goodputs,
        "ratio_to_vllm": ratios,
        "points": {name: [p.summary for p in series] for name, series in points.items()},
    }


def _headline(
    servers: list[Server],
    tokenizer: Any,
    conversations: list[tuple[str, str]],
    workload: str,
    rate: float,
    swept: list[float],
    args: argparse.Namespace,
    custom: dict[str, SloSet],
) -> dict[str, Any]:
    """The headline point again with each other seed (new request list and arrivals)."""
    settings = settings_for(workload, custom)
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    for seed in args.seeds:
        if seed == args.seed and rate in swept:
            continue  # the sweep ran this one
        requests = workloads.build(
            workload, tokenizer, args.num_prompts, workloads.point_seed(seed, rate), conversations
        )
        for s in servers:
            summary = _measure(s, requests, rate, settings, seed, args, workload).summary
            keys = ("slo_attainment", "median_ttft_ms", "median_tpot_ms", "load_average_before")
            runs[s.name].append({"seed": seed, **{k: summary[k] for k in keys}})
    return {"workload": workload, "rate": rate, "runs": runs}


def _measure(
    s: Server,
    requests: list[workloads.BenchRequest],
    rate: float,
    settings: dict[str, SloSet],
    seed: int,
    args: argparse.Namespace,
    workload: str,
) -> Point:
    """One point on one server; its per-request data saved under raw/, a line printed."""
    point = asyncio.run(
        run_point(
            s.base_url, requests, rate, settings, seed=seed, burstiness=args.burstiness,
            ignore_eos=not args.no_ignore_eos, max_request_s=args.max_request_s,
            label=f"{s.name} {workload} {rate:g}/s seed {seed}",
        )
    )  # fmt: skip
    save_point(args.out / "raw", f"{s.name}-{workload}-{rate:g}-seed{seed}", point)
    print_table(f"{s.name}, {workload}, seed {seed}", [point])
    return point


def _plot(
    out: Path, workload: str, points: dict[str, list[Point]], settings: dict[str, SloSet]
) -> None:
    for name in settings:
        curves = {
            system: [
                (p.summary["request_rate"], p.summary["slo_attainment"][name]["both"])
                for p in series
            ]
            for system, series in points.items()
        }
        plots.attainment_plot(
            out / f"{workload}-{name}-attainment.png", f"{workload}: {name} SLO", curves
        )
    first = next(iter(settings.values()))
    middle = {system: series[len(series) // 2] for system, series in points.items()}
    rate = next(iter(middle.values())).summary["request_rate"]
    slo = next(iter(first.values()))
    plots.cdf_plot(
        out / f"{workload}-ttft-cdf.png", f"{workload}: TTFT at {rate:g} req/s",
        {n: [r.ttft for r in p.results if r.ttft is not None] for n, p in middle.items()},
        "time to first token (s)", slo.ttft,
    )  # fmt: skip
    plots.cdf_plot(
        out / f"{workload}-tpot-cdf.png", f"{workload}: TPOT at {rate:g} req/s",
        {n: [t for r in p.results if (t := r.tpot) is not None] for n, p in middle.items()},
        "time per output token (s)", slo.tpot,
    )  # fmt: skip


def _write(out: Path, report: dict[str, Any]) -> None:
    (out / "summary.json").write_text(json.dumps(report, indent=1))
    (out / "table.md").write_text(table(report))


def table(report: dict[str, Any]) -> str:
    """Goodput (req/s where 90% meet both SLOs) per system, and tandem / vLLM."""
    lines = [
        "| workload | SLO | system | goodput (req/s) | per core | ÷ vLLM |",
        "|---|---|---|---|---|---|",
    ]
    cores = report["machine"]["cores"]
    for workload, result in report["workloads"].items():
        for slo in result["slos"]:
            for system, by_slo in result["goodput"].items():
                value = by_slo[slo]
                ratio = result["ratio_to_vllm"].get(system, {}).get(slo)
                peer = result["goodput"].get("vllm", {}).get(slo, {"bound": "exact"})
                exact = value["bound"] == peer["bound"] == "exact"
                ratio_text = (
                    "" if ratio is None else f"{ratio:.2f}×" + ("" if exact else " (bound)")
                )
                per_core = value["rate"] / cores
                lines.append(
                    f"| {workload} | {slo} | {system} | {goodput_text(value)} | {per_core:.2f} | "
                    f"{ratio_text} |"
                )
    return "\n".join(lines) + "\n"


def _machine() -> dict[str, Any]:
    return {"cores": len(os.sched_getaffinity(0)), "load_average_start": list(os.getloadavg())}
