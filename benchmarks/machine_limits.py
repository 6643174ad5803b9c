"""What this machine's torch can do: GEMM GFLOP/s in a dtype, and memory read bandwidth.

These are the yardsticks engine_bench.py holds tandem against. Both are bests, not
medians: a ceiling is what the hardware and torch reach when nothing interferes.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F
from bench_common import load_average, time_repeated

from engine.config import ModelConfig
from engine.kernels import cpu_kernels

BANDWIDTH_BYTES = 512 << 20


def gemm_shapes(cfg: ModelConfig, num_tokens: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of the model's prefill projections, plus a large square GEMM."""
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return [
        (num_tokens, cfg.hidden_size, q_size + 2 * kv_size),  # qkv_proj
        (num_tokens, q_size, cfg.hidden_size),  # o_proj
        (num_tokens, cfg.hidden_size, 2 * cfg.intermediate_size),  # gate_up_proj
        (num_tokens, cfg.intermediate_size, cfg.hidden_size),  # down_proj
        (2048, 2048, 2048),
    ]


def measure_ceiling(shapes: list[tuple[int, int, int]], dtype: torch.dtype) -> dict[str, Any]:
    """Best GFLOP/s over the shapes of torch's F.linear (x @ W.T, as nn.Linear does) and of
    tandem's packed C++ linear kernel, whichever is faster: the ceiling is what this
    machine's best GEMM reaches."""
    cpu_kernels.load()
    per_shape = []
    for m, k, n in shapes:
        x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        packed = torch.ops.tandem.pack_linear_weight(w)
        flops = 2 * m * k * n
        row: dict[str, Any] = {"shape_mkn": [m, k, n]}
        kernels = {
            "torch": lambda x=x, w=w: F.linear(x, w),
            "packed": lambda x=x, p=packed, n=n: torch.ops.tandem.packed_linear(x, p, n, None),
        }
        for name, fn in kernels.items():
            seconds = time_repeated(fn, repeats=7, warmup=2)
            row[f"{name}_best_gflops"] = flops / min(seconds) / 1e9
            row[f"{name}_median_gflops"] = flops / statistics.median(seconds) / 1e9
        row["best_gflops"] = max(row["torch_best_gflops"], row["packed_best_gflops"])
        per_shape.append(row)
    return {
        "gflops": max(s["best_gflops"] for s in per_shape),
        "shapes": per_shape,
        "loadavg": load_average(),
    }


def measure_bandwidth(num_bytes: int = BANDWIDTH_BYTES) -> dict[str, Any]:
    """Best read bandwidth (GB/s) of a float32 sum, and of a copy (read + write)."""
    src = torch.rand(num_bytes // 4, dtype=torch.float32)  # real data: no shared zero pages
    dst = torch.empty_like(src)
    sum_s = time_repeated(lambda: src.sum(), repeats=10, warmup=2)
    copy_s = time_repeated(lambda: dst.copy_(src), repeats=10, warmup=2)
    return {
        "read_gbs": num_bytes / min(sum_s) / 1e9,
        "copy_gbs": 2 * num_bytes / min(copy_s) / 1e9,
        "tensor_bytes": num_bytes,
        "loadavg": load_average(),
    }


def measure_limits(cfg: ModelConfig, dtype: torch.dtype, num_tokens: int) -> dict[str, Any]:
    """One pass over the GEMM ceiling (at the model's shapes for `num_tokens`) and the bandwidth."""
    return {
        "ceiling": measure_ceiling(gemm_shapes(cfg, num_tokens), dtype),
        "bandwidth": measure_bandwidth(),
    }


def best_limits(passes: list[dict[str, Any]]) -> tuple[float, float]:
    """The best ceiling (GFLOP/s) and read bandwidth (GB/s) over the passes.

    Each pass is taken at a different time (before and after the engine's timings), so a
    burst of load from other work on the machine lowers at most one of them.
    """
    gflops = max(p["ceiling"]["gflops"] for p in passes)
    read_gbs = max(p["bandwidth"]["read_gbs"] for p in passes)
    return gflops, read_gbs
