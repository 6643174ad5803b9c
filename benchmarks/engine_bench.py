"""How close tandem's prefill and decode come to what this machine can do.

For each dtype, measured in the same run:
  ceiling    the best GFLOP/s of torch GEMMs in that dtype (the model's prefill shapes
             and a large square one);
  bandwidth  the best memory read bandwidth (a float32 sum over a tensor far larger
             than the caches);
  prefill    one 512-token request (max_tokens=1, prefix caching off): median time and
             model FLOPs / ceiling / time, as a % of the ceiling;
  decode     engine step time at batch 1, 8 and 32 (~256-token prompts), timed only on
             steps where every request decodes, against the floor
             (weight bytes as the engine holds them + KV bytes read) / bandwidth.

Each is measured per linear kernel (--linear-kernels): "quantized" (the GGUF's Q4_1/Q8_0
blocks, dequantized in the kernel), "packed" (float weights) and "torch" (MKL).

    python benchmarks/engine_bench.py [--dtype both|float32|bfloat16] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch
from bench_common import (
    RESULTS_DIR,
    load_average,
    machine_info,
    random_prompts,
    summarize,
    time_once,
    time_repeated,
    warn_if_busy,
    write_json,
)
from machine_limits import best_limits, measure_limits
from torch import nn

from engine.config import ModelConfig
from engine.engine import LLMEngine
from engine.kernels.packed_linear import PackedLinear, QuantizedLinear
from engine.models.llama import RMSNorm
from tandem import LLM, SamplingParams

NUM_THREADS = 2
PREFILL_LEN = 512
DECODE_PROMPT_LEN = 256


# ---- the model's work ------------------------------------------------------------------


def linear_params(cfg: ModelConfig) -> dict[str, int]:
    """Weights of the decoder layers' linear projections, and of the lm_head.

    Counted from the config: the engine may hold the weights packed for its kernels.
    """
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = (
        cfg.hidden_size * (q_size + 2 * kv_size)  # qkv_proj
        + q_size * cfg.hidden_size  # o_proj
        + 3 * cfg.hidden_size * cfg.intermediate_size  # gate_up_proj, down_proj
    )
    return {"layers": cfg.num_layers * per_layer, "lm_head": cfg.vocab_size * cfg.hidden_size}


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes one decode step must read: every linear layer's weight as the engine holds
    it (plain, packed or block-quantized; the lm_head too), and the norms. A PackedLinear's
    plain copy, kept for AMX tiles, is not read by a small step and is not counted."""
    kinds = (nn.Linear, PackedLinear, QuantizedLinear, RMSNorm)
    return sum(
        tensor.nbytes
        for module in model.modules()
        if isinstance(module, kinds)
        for name, tensor in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]
        if not (isinstance(module, PackedLinear) and name == "weight")
    )


def prefill_flops(cfg: ModelConfig, params: dict[str, int], num_tokens: int) -> int:
    """Linear layers for every token, causal attention, and the lm_head for the last row."""
    linear = 2 * num_tokens * params["layers"]
    causal_pairs = num_tokens * (num_tokens + 1) // 2
    attention = (
        cfg.num_layers * cfg.num_heads * 2 * (2 * causal_pairs * cfg.head_dim)
    )  # QK^T and PV
    return linear + attention + 2 * params["lm_head"]


def kv_bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize


# ---- tandem's timings ------------------------------------------------------------------


def measure_prefill(llm: LLM, repeats: int) -> list[float]:
    """Seconds of `repeats` one-step prefills of a fresh 512-token prompt."""
    prompt = random_prompts(1, PREFILL_LEN, llm.engine.model_config.vocab_size, seed=1)[0]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    return time_repeated(lambda: llm.generate([prompt], params), repeats, warmup=1)


def prefill_report(seconds: list[float], flops: int, ceiling_gflops: float) -> dict[str, Any]:
    stats = summarize(seconds)
    achieved = flops / stats["median_s"] / 1e9
    return {
        "num_tokens": PREFILL_LEN,
        "gflop": flops / 1e9,
        "achieved_gflops": achieved,
        "pct_of_ceiling": 100 * achieved / ceiling_gflops,
        **stats,
    }


def _all_decoding(engine: LLMEngine, request_ids: list[str]) -> bool:
    requests = [engine.requests[i] for i in request_ids]
    return all(r.num_computed_tokens >= r.num_prompt_tokens for r in requests)


def _timed_decode_step(engine: LLMEngine, request_ids: list[str]) -> tuple[float, int]:
    """Seconds of one all-decode step, and the context tokens it attended over."""
    context = sum(engine.requests[i].num_computed_tokens + 1 for i in request_ids)
    outputs: list[Any] = []
    seconds = time_once(lambda: outputs.extend(engine.step()))
    if len(outputs) != len(request_ids) or any(o.finished for o in outputs):
        raise RuntimeError(
            f"expected {len(request_ids)} running decodes, got {len(outputs)} outputs"
        )
    return seconds, context


def measure_decode(engine: LLMEngine, batch_size: int, num_steps: int) -> dict[str, Any]:
    """Step times and loads of `num_steps` steps where all `batch_size` requests decode."""
    prompts = random_prompts(
        batch_size, DECODE_PROMPT_LEN, engine.model_config.vocab_size, seed=batch_size
    )
    params = SamplingParams(max_tokens=64 + num_steps, temperature=0, ignore_eos=True)
    request_ids = [engine.add_request(p, params) for p in prompts]
    while not _all_decoding(engine, request_ids):
        engine.step()
    _timed_decode_step(engine, request_ids)  # warm-up at the final shapes
    samples = [_timed_decode_step(engine, request_ids) for _ in range(num_steps)]
    for request_id in request_ids:
        engine.abort_request(request_id)
    engine.step()  # collect the aborted outputs
    return {
        "batch_size": batch_size,
        "seconds": [s for s, _ in samples],
        "contexts": [c for _, c in samples],
        "loadavg": load_average(),
    }


def decode_report(
    raw: dict[str, Any], weight_bytes: int, kv_per_token: int, read_gbs: float
) -> dict[str, Any]:
    """Median step time against the floor: (weights + the KV the step attends over) / bandwidth."""
    floors = [(weight_bytes + kv_per_token * c) / (read_gbs * 1e9) for c in raw["contexts"]]
    stats = summarize(raw["seconds"])
    batch_size = raw["batch_size"]
    return {
        "batch_size": batch_size,
        **stats,
        "floor_s": statistics.median(floors),
        "x_floor": stats["median_s"] / statistics.median(floors),
        "mean_context": statistics.mean(raw["contexts"]) / batch_size,
        "tokens_per_s": batch_size / stats["median_s"],
        "loadavg": raw["loadavg"],
    }


# ---- one dtype, the table, the CLI -------------------------------------------------------


def load_llm(dtype: str, linear_kernel: str, model: str | None) -> LLM:
    print(f"[{dtype}] loading the engine ({linear_kernel} linear layers)", flush=True)
    return LLM(
        model=model, dtype=dtype, max_num_batched_tokens=PREFILL_LEN,
        enable_prefix_caching=False, num_threads=NUM_THREADS, linear_kernel=linear_kernel,
    )  # fmt: skip


def run_dtype(dtype: str, linear_kernel: str, args: argparse.Namespace) -> dict[str, Any]:
    llm = load_llm(dtype, linear_kernel, args.model)
    engine = llm.engine
    torch_dtype, cfg = engine.config.torch_dtype, engine.model_config
    print(f"[{dtype}] machine limits, first pass", flush=True)
    passes = [measure_limits(cfg, torch_dtype, PREFILL_LEN)]
    print(f"[{dtype}] prefill", flush=True)
    prefill_s = measure_prefill(llm, args.repeats)
    prefill_load = load_average()
    decode_raw = []
    for batch_size in args.batch_sizes:
        print(f"[{dtype}] decode at batch {batch_size}", flush=True)
        decode_raw.append(measure_decode(engine, batch_size, args.decode_steps))
    print(f"[{dtype}] machine limits, second pass", flush=True)
    passes.append(measure_limits(cfg, torch_dtype, PREFILL_LEN))
    gflops, read_gbs = best_limits(passes)
    params = linear_params(engine.model_config)
    weight_bytes = decode_weight_bytes(engine.model)
    kv_per_token = kv_bytes_per_token(cfg, torch_dtype.itemsize)
    prefill = prefill_report(prefill_s, prefill_flops(cfg, params, PREFILL_LEN), gflops)
    return {
        "dtype": dtype,
        "linear_kernel": linear_kernel,
        "ceiling_gflops": gflops,
        "read_gbs": read_gbs,
        "limit_passes": passes,
        "linear_params": params,
        "decode_weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_per_token,
        "prefill": {**prefill, "loadavg": prefill_load},
        "decode": [decode_report(raw, weight_bytes, kv_per_token, read_gbs) for raw in decode_raw],
    }


def print_table(results: dict[str, dict[str, Any]]) -> None:
    for name, r in results.items():
        p = r["prefill"]
        print(
            f"\n== {name}: ceiling {r['ceiling_gflops']:.1f} GFLOP/s, "
            f"read bandwidth {r['read_gbs']:.1f} GB/s"
        )
        print(
            f"prefill {p['num_tokens']} tokens: {1e3 * p['median_s']:.1f} ms median, "
            f"{p['achieved_gflops']:.1f} GFLOP/s = {p['pct_of_ceiling']:.1f}% of ceiling, "
            f"load {p['loadavg']}"
        )
        header = f"{'batch':>5} {'step ms':>9} {'floor ms':>9} {'x floor':>8} {'tok/s':>8}"
        print(f"{header} {'ctx':>6}  load")
        for d in r["decode"]:
            print(
                f"{d['batch_size']:>5} {1e3 * d['median_s']:>9.2f} {1e3 * d['floor_s']:>9.2f} "
                f"{d['x_floor']:>8.2f} {d['tokens_per_s']:>8.1f} {d['mean_context']:>6.0f}  "
                f"{d['loadavg']}"
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["both", "float32", "bfloat16"], default="both")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "engine.json")
    parser.add_argument(
        "--model", default=None, help="model path (default: the engine's default GGUF)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed prefills per dtype")
    parser.add_argument(
        "--decode-steps", type=int, default=16, help="timed all-decode steps per batch"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--linear-kernels", nargs="+", choices=["quantized", "packed", "torch"],
        default=["quantized", "packed", "torch"],
        help="engines to measure: tandem's C++ linear layers on the GGUF's quantized blocks "
        "and on float weights, and torch's (MKL) as the reference in the same run",
    )  # fmt: skip
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(NUM_THREADS)
    warn_if_busy()
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    started = load_average()
    results = {
        f"{dtype}, {kernel} linear": run_dtype(dtype, kernel, args)
        for dtype in dtypes
        for kernel in args.linear_kernels
    }
    print_table(results)
    meta = {
        **machine_info(),
        "loadavg_start": started,
        "loadavg_end": load_average(),
        "model": args.model,
    }
    write_json(args.out, {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
