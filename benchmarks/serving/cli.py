"""`tandem bench run` (one server) and `tandem bench compare` (tandem's modes and vLLM,
started on the same cores, taking turns rate by rate)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.serving import plots, workloads
from benchmarks.serving.run import (
    DEFAULT_MAX_REQUEST_S,
    DEFAULT_SLOS,
    Point,
    parse_slo,
    print_table,
    run_point,
    sweep_summary,
)
from benchmarks.serving.stats import SloSet

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
DEFAULT_RATES = {
    "sharegpt": [1.0, 2.0, 3.0, 4.0],
    "long": [0.25, 0.5, 1.0, 1.5],
    "mix": [0.5, 1.0, 2.0, 3.0],
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tandem bench", description=__doc__)
    commands = top.add_subparsers(dest="bench_command", required=True)
    run = commands.add_parser(
        "run", help="sweep request rates against one OpenAI-compatible server"
    )
    run.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    run.add_argument("--workload", choices=workloads.WORKLOADS, default="sharegpt")
    run.add_argument("--rates", type=float, nargs="+", default=None, help="requests per second")
    run.add_argument("--label", default="server", help="names the result files")
    run.add_argument(
        "--tokenizer",
        default=None,
        help="the served model's .gguf file or directory, for its tokenizer (default: SmolLM2)",
    )
    run.add_argument("--out", type=Path, default=RESULTS_DIR / "raw")
    compare = commands.add_parser("compare", help="tandem's modes and vLLM, side by side")
    compare.add_argument("--systems", nargs="+", default=None, help="default: all four")
    compare.add_argument(
        "--workloads", nargs="+", choices=workloads.WORKLOADS, default=list(workloads.WORKLOADS)
    )
    compare.add_argument(
        "--rates",
        nargs="+",
        default=[],
        metavar="WORKLOAD=R1,R2,...",
        help="override a workload's rates",
    )
    compare.add_argument(
        "--headline",
        default="sharegpt=2",
        metavar="WORKLOAD=RATE",
        help="the point repeated with --seeds",
    )
    compare.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    compare.add_argument("--cpus", default="0-1", help="the cores every system runs on")
    compare.add_argument("--dtype", default="bfloat16")
    compare.add_argument("--vllm-venv", type=Path, default=None)
    compare.add_argument("--out", type=Path, default=RESULTS_DIR / "serving")
    for sub in (run, compare):
        sub.add_argument("--num-prompts", type=int, default=60, help="requests per rate")
        sub.add_argument("--seed", type=int, default=0, help="request list and arrivals")
        sub.add_argument("--burstiness", type=float, default=1.0, help="1: Poisson; gamma shape")
        sub.add_argument("--max-request-s", type=float, default=DEFAULT_MAX_REQUEST_S)
        sub.add_argument("--no-ignore-eos", action="store_true", help="for servers without it")
        sub.add_argument(
            "--slo",
            action="append",
            default=[],
            metavar="NAME=KIND:TTFT_S:TPOT_S[,...]",
            help="replaces the workload's SLO settings (repeat for several)",
        )
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        custom = dict(parse_slo(text) for text in args.slo)
        if args.bench_command == "run":
            asyncio.run(_run(args, custom))
        else:
            from benchmarks.serving.compare import compare

            compare(args, custom)
    except (ValueError, RuntimeError) as error:
        print(f"tandem bench: {error}", file=sys.stderr)
        return 2
    return 0


def settings_for(workload: str, custom: dict[str, SloSet]) -> dict[str, SloSet]:
    return custom or DEFAULT_SLOS[workload]


def tokenizer_for(model: Path | str | None = None) -> Any:
    """The tokenizer of `model` (a .gguf file or a safetensors directory, as for `tandem
    serve --model`); the default model's when None."""
    from engine.models.source import resolve_model
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model(model))


def save_point(out: Path, name: str, point: Point) -> None:
    """The full result of one rate, as `vllm bench serve --save-result` writes it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({**point.summary, **point.raw()}))


async def _run(args: argparse.Namespace, custom: dict[str, SloSet]) -> None:
    settings = settings_for(args.workload, custom)
    rates = args.rates or DEFAULT_RATES[args.workload]
    tokenizer = tokenizer_for(args.tokenizer)
    base_url = args.url.rstrip("/")
    points = []
    for rate in rates:
        seed = workloads.point_seed(args.seed, rate)  # a fresh list: no prefix-cache replay
        requests = workloads.build(args.workload, tokenizer, args.num_prompts, seed)
        point = await run_point(
            base_url, requests, rate, settings, seed=args.seed, burstiness=args.burstiness,
            ignore_eos=not args.no_ignore_eos, max_request_s=args.max_request_s,
            label=f"{args.label} {args.workload} {rate:g} req/s",
        )  # fmt: skip
        save_point(args.out, f"{args.label}-{args.workload}-{rate:g}", point)
        points.append(point)
    goodputs = sweep_summary(points, settings)
    summary = {
        "label": args.label,
        "workload": args.workload,
        "url": base_url,
        "goodput": goodputs,
        "points": [p.summary for p in points],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.label}-{args.workload}-sweep.json").write_text(
        json.dumps(summary, indent=1)
    )
    for name in settings:
        curve = {
            args.label: [
                (p.summary["request_rate"], p.summary["slo_attainment"][name]["both"])
                for p in points
            ]
        }
        plots.attainment_plot(
            args.out / f"{args.label}-{args.workload}-{name}.png",
            f"{args.workload}, {name} SLO",
            curve,
        )
    print_table(f"{args.label}, {args.workload} ({len(requests)} requests per rate)", points)
    for name, value in goodputs.items():
        print(f"goodput ({name}, 90% meet both targets): {goodput_text(value)}")
    print(f"results: {args.out}")


def goodput_text(value: dict[str, Any]) -> str:
    if value["bound"] == "below":
        return "below the lowest rate swept"
    prefix = ">= " if value["bound"] == "at_least" else ""
    return f"{prefix}{value['rate']:.2f} req/s"
