"""Engine step times, tandem against vLLM, each in-process on both cores.

For each case (running requests, and the length of a prompt joining them), runs
`step_worker.py` once under tandem's venv and once under vLLM's, a fresh process
each, for `--rounds` rounds, the two taking turns; prints the medians and their
ratios and writes them to JSON. Same token-id prompts, greedy, prefix caching off.

    .venv/bin/python benchmarks/step_bench.py [--cases 96:0 96:256 16:1024] \
        [--rounds 2] [--out benchmarks/results/step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_common import (
    RESULTS_DIR,
    load_average,
    machine_info,
    warn_if_busy,
    write_json,
)
from benchmarks.export_model import DEFAULT_OUT, ensure_exported
from benchmarks.serving.systems import find_vllm_venv, vllm_env

WORKER = Path(__file__).resolve().parent / "step_worker.py"


def parse_case(text: str) -> tuple[int, int]:
    batch, _, prompt_len = text.partition(":")
    try:
        return int(batch), int(prompt_len or 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a case is BATCH:PROMPT_LEN, e.g. 96:0 or 16:1024"
        ) from None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", nargs="+", type=parse_case, default=[(96, 0), (96, 256), (16, 1024)],
        help="BATCH:PROMPT_LEN: that many decoding requests, and a prompt every 4th step",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--budget", type=int, default=8192, help="max_num_batched_tokens")
    parser.add_argument("--cpus", default="0-1", help="vLLM's OpenMP threads are bound here")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vllm-venv", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "step.json")
    return parser.parse_args()


def run_worker(
    system: str, case: tuple[int, int], args: argparse.Namespace, model_dir: Path, venv: Path
) -> dict[str, Any]:
    batch, prompt_len = case
    python = sys.executable if system == "tandem" else str(venv / "bin" / "python")
    env = dict(os.environ)
    if system == "vllm":
        env.update(vllm_env(venv, args.cpus, kv_cache_gb=2))
    command = [
        python, str(WORKER), "--system", system, "--model", str(model_dir),
        "--dtype", args.dtype, "--batch", str(batch), "--prompt-len", str(prompt_len),
        "--steps", str(args.steps), "--budget", str(args.budget),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{system} worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main() -> None:
    args = parse_args()
    warn_if_busy()
    model_dir = ensure_exported(args.model_dir)
    venv = find_vllm_venv(args.vllm_venv)
    started = load_average()
    rows = []
    for batch, prompt_len in args.cases:
        runs: dict[str, list[float]] = {"tandem": [], "vllm": []}
        loads = []
        for round_index in range(args.rounds):
            order = ["tandem", "vllm"] if round_index % 2 == 0 else ["vllm", "tandem"]
            for system in order:
                loads.append(load_average())
                result = run_worker(system, (batch, prompt_len), args, model_dir, venv)
                runs[system].append(round(result["median_s"] * 1e3, 2))
        ratios = [t / v for t, v in zip(runs["tandem"], runs["vllm"], strict=True)]
        rows.append({
            "batch": batch, "prompt_len": prompt_len, "tandem_median_ms": runs["tandem"],
            "vllm_median_ms": runs["vllm"], "tandem_over_vllm": [round(r, 3) for r in ratios],
            "load_average_before": loads,
        })  # fmt: skip
        print(
            f"{batch} decoding + {prompt_len}-token prompt: tandem {runs['tandem']} ms, "
            f"vLLM {runs['vllm']} ms, tandem / vLLM {min(ratios):.2f}-{max(ratios):.2f}",
            flush=True,
        )
    meta = {**machine_info(), "loadavg_start": started, "loadavg_end": load_average()}
    write_json(args.out, {"meta": meta, "config": vars(args), "results": rows})


if __name__ == "__main__":
    main()
