"""What tensor parallelism costs and gives on this machine: one model instance on one
process against the same instance split by heads over N processes (engine/parallel.py).

Measured in the same run, for each layout (processes x torch threads each):
  prefill  one 512-token request, one step (median of --repeats);
  decode   engine step time with every request decoding, at batch 1 and 8 (~256-token
           prompts), median over --steps steps.

A split step adds two all-reduces per layer and one broadcast of the step (62 gloo
collectives for SmolLM2's 30 layers); `collective_ms` is what the split step costs beyond
a 1/N share of the one-process step with the same threads per process, per collective.

    python benchmarks/tensor_parallel_bench.py [--layouts 1x2 1x1 3x1] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from bench_common import (
    RESULTS_DIR,
    load_average,
    machine_info,
    random_prompts,
    summarize,
    time_repeated,
    warn_if_busy,
    write_json,
)
from engine_bench import DECODE_PROMPT_LEN, PREFILL_LEN, measure_decode

from engine.config import EngineConfig, resolve_dtype
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams


def prefill_seconds(engine: LLMEngine, repeats: int) -> list[float]:
    prompt = random_prompts(1, PREFILL_LEN, engine.model_config.vocab_size, seed=1)[0]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def once() -> None:
        request_id = engine.add_request(prompt, params)
        while not any(o.request_id == request_id and o.finished for o in engine.step()):
            pass

    return time_repeated(once, repeats, warmup=1)


def run_layout(layout: str, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    size, threads = (int(x) for x in layout.split("x"))
    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            dtype=dtype,
            tensor_parallel_size=size,
            num_threads=threads,
            max_num_batched_tokens=PREFILL_LEN,
            enable_prefix_caching=False,
            num_blocks=1024,
        )
    )
    try:
        result: dict[str, Any] = {
            "tensor_parallel_size": size,
            "threads_per_process": threads,
            "num_layers": engine.model_config.num_layers,
            "prefill": summarize(prefill_seconds(engine, args.repeats)),
            "decode": {},
        }
        for batch_size in args.batch_sizes:
            raw = measure_decode(engine, batch_size, args.steps)
            result["decode"][str(batch_size)] = {
                "median_ms": 1000 * statistics.median(raw["seconds"]),
                "loadavg": raw["loadavg"],
            }
        result["loadavg"] = load_average()
        return result
    finally:
        engine.close()


def collective_overhead(split: dict[str, Any], whole: dict[str, Any]) -> dict[str, float]:
    """ms per collective beyond a 1/N share of the whole model's step."""
    size = split["tensor_parallel_size"]
    collectives = 2 * split["num_layers"] + 2
    out = {}
    for batch_size, step in split["decode"].items():
        share = whole["decode"][batch_size]["median_ms"] / size
        out[batch_size] = (step["median_ms"] - share) / collectives
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", default=["1x2", "1x1", "3x1"], help="NxT")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "tensor_parallel.json")
    args = parser.parse_args()
    warn_if_busy()
    dtype = resolve_dtype(args.dtype)
    results = {layout: run_layout(layout, dtype, args) for layout in args.layouts}
    whole = next((r for r in results.values() if r["tensor_parallel_size"] == 1), None)
    print(f"\ntensor parallelism, {dtype}, {PREFILL_LEN}-token prefill, decode at "
          f"{DECODE_PROMPT_LEN}-token prompts (processes x threads)")  # fmt: skip
    print(f"{'layout':>8} {'prefill ms':>11} " + " ".join(
        f"{'decode b' + b + ' ms':>14}" for b in map(str, args.batch_sizes)
    ))  # fmt: skip
    for layout, r in results.items():
        cells = " ".join(f"{r['decode'][str(b)]['median_ms']:>14.1f}" for b in args.batch_sizes)
        print(f"{layout:>8} {1000 * r['prefill']['median_s']:>11.1f} {cells}")
    if whole is not None:
        same_threads = {
            r["threads_per_process"]: r for r in results.values() if r["tensor_parallel_size"] == 1
        }
        for layout, r in results.items():
            base = same_threads.get(r["threads_per_process"])
            if r["tensor_parallel_size"] > 1 and base is not None:
                r["collective_ms"] = collective_overhead(r, base)
                print(f"{layout}: ms per collective beyond a 1/N share: {r['collective_ms']}")
    write_json(args.out, {"machine": machine_info(), "dtype": dtype, "layouts": results})


if __name__ == "__main__":
    main()
