"""Helpers shared by the benchmark scripts: timing, prompts, machine facts, JSON output.

The machine is shared and noisy, so every figure is a median (or a best, for
ceilings) and every result carries the load average at the time it was taken.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def warn_if_busy() -> None:
    """Says so when other work already keeps a core busy: two threads on two cores then
    stall at every OpenMP barrier, and step times can grow tenfold."""
    one_minute = os.getloadavg()[0]
    if one_minute >= 1.0:
        print(
            f"warning: load average {one_minute:.2f} before the benchmark; figures may be inflated"
        )


def time_once(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def time_repeated(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call for `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return [time_once(fn) for _ in range(repeats)]


def summarize(seconds: list[float]) -> dict[str, Any]:
    """Median, best and all samples, in seconds."""
    return {
        "median_s": statistics.median(seconds),
        "best_s": min(seconds),
        "samples_s": [round(s, 6) for s in seconds],
    }


def random_prompts(
    num_prompts: int, prompt_len: int, vocab_size: int, seed: int = 0
) -> list[list[int]]:
    """Reproducible random token ids, avoiding the low ids where special tokens live."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size) for _ in range(prompt_len)] for _ in range(num_prompts)]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    return {
        "cpu": cpu_model(),
        "num_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")  # Paths as strings
    print(f"wrote {path}", flush=True)
