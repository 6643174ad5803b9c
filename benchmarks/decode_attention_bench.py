"""Decode attention alone: tandem's C++ kernel (the `cpu` backend) against the `torch`
backend (gather the blocks, SDPA), same inputs, same run.

For each dtype, batch and context: one layer's call on a cache small enough to stay in
the CPU's caches ("warm"), and the same call cycling over 30 layers' caches of 1,024
blocks each, as an engine step reads them ("cold": the KV comes from memory). SmolLM2's
shape: 9 query heads, 3 KV heads, head_dim 64, 16-token blocks, 2 threads.

    python benchmarks/decode_attention_bench.py [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import RESULTS_DIR, load_average, machine_info, warn_if_busy, write_json

from engine.attention import AttentionBatch
from engine.attention.cpu_backend import CpuAttention
from engine.attention.torch_backend import TorchAttention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
LAYERS, COLD_BLOCKS = 30, 1024


def batch_for(num_seqs: int, context: int, num_blocks: int) -> AttentionBatch:
    per_seq = -(-context // BLOCK)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(num_seqs))
    tables = order[: num_seqs * per_seq].view(num_seqs, per_seq).tolist()
    return AttentionBatch(
        query_lens=[1] * num_seqs,
        context_lens=[context] * num_seqs,
        block_tables=tables,
        block_size=BLOCK,
    )


def time_calls(
    backend: Any, caches: list[torch.Tensor], batch: AttentionBatch, dtype: Any
) -> float:
    """Median seconds of one layer's call, over rounds of a call per cache."""
    n = len(batch.query_lens)
    q = torch.randn(n, HEADS, HEAD_DIM).to(dtype)
    kv = torch.randn(n, KV_HEADS, HEAD_DIM).to(dtype)
    plan = backend.plan(batch)
    rounds = max(3, 60 // len(caches))
    seconds = []
    for _ in range(rounds + 1):
        begin = time.perf_counter()
        for cache in caches:
            backend.forward(q, kv, kv, cache, plan)
        seconds.append((time.perf_counter() - begin) / len(caches))
    return statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "decode_attention.json")
    args = parser.parse_args()
    warn_if_busy()
    torch.set_num_threads(2)
    backends = {
        "cpu": CpuAttention(HEADS, KV_HEADS, HEAD_DIM),
        "torch": TorchAttention(HEADS, KV_HEADS, HEAD_DIM),
    }
    rows = []
    print(f"{'dtype':>9} {'batch':>5} {'context':>7} {'cache':>5} {'cpu us':>8} {'torch us':>9} "
          f"{'torch / cpu':>11}")  # fmt: skip
    for dtype in (torch.bfloat16, torch.float32):
        for num_seqs, context in ((1, 256), (8, 256), (32, 256), (8, 1500)):
            warm_blocks = num_seqs * -(-context // BLOCK) + 1
            for label, num_caches, num_blocks in (
                ("warm", 1, warm_blocks),
                ("cold", LAYERS, COLD_BLOCKS),
            ):
                shape = CpuAttention.kv_cache_shape(num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
                caches = [torch.randn(shape).to(dtype) for _ in range(num_caches)]
                batch = batch_for(num_seqs, context, num_blocks)
                times = {name: time_calls(b, caches, batch, dtype) for name, b in backends.items()}
                row = {
                    "dtype": str(dtype).removeprefix("torch."),
                    "batch": num_seqs,
                    "context": context,
                    "cache": label,
                    "cpu_us": 1e6 * times["cpu"],
                    "torch_us": 1e6 * times["torch"],
                    "loadavg": load_average(),
                }
                rows.append(row)
                print(f"{row['dtype']:>9} {num_seqs:>5} {context:>7} {label:>5} "
                      f"{row['cpu_us']:>8.1f} {row['torch_us']:>9.1f} "
                      f"{times['torch'] / times['cpu']:>10.1f}x")  # fmt: skip
    write_json(args.out, {"machine": machine_info(), "rows": rows})


if __name__ == "__main__":
    main()
