"""One engine's step time, in-process; run by step_bench.py, once per case and system.

`--system tandem` runs tandem's `LLMEngine` (in tandem's venv); `--system vllm` runs
vLLM's engine in its own venv and imports nothing from tandem. Both get the same
token-id prompts: `--batch` running requests of 150-350 tokens, greedy, each allowed
1,000 tokens (more than the timed steps reach); then `--steps` steps are timed. With
`--prompt-len`, every fourth step also carries a new prompt of that many tokens (one
output token), and only those steps are timed. Prints one JSON object:
`bench_common.summarize` of the step times.

    python benchmarks/step_worker.py --system tandem|vllm --model DIR \
        [--batch 96] [--prompt-len 0] [--steps 40] [--budget 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_common import summarize  # stdlib only: importable in vLLM's venv too

PROMPT_EVERY = 4
WARMUP_STEPS = 3


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=["tandem", "vllm"], required=True)
    parser.add_argument("--model", required=True, help="a Hugging Face safetensors directory")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=96)
    parser.add_argument("--prompt-len", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--budget", type=int, default=8192, help="max_num_batched_tokens")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def _tandem(args: argparse.Namespace) -> tuple[Callable[[list[int], int], None], Callable[[], Any]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            dtype=args.dtype,
            max_num_batched_tokens=args.budget,
            enable_prefix_caching=False,
            num_threads=args.threads,
            kv_cache_memory_bytes=2 << 30,
        )
    )

    def add(prompt: list[int], max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        engine.add_request(prompt, params)

    return add, engine.step


def _vllm(args: argparse.Namespace) -> tuple[Callable[[list[int], int], None], Callable[[], Any]]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_num_batched_tokens=args.budget,
        max_num_seqs=256,
        enable_prefix_caching=False,
        kv_cache_memory_bytes=2 << 30,
    )
    engine = llm.llm_engine
    counter = iter(range(1 << 30))

    def add(prompt: list[int], max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        engine.add_request(str(next(counter)), TokensPrompt(prompt_token_ids=prompt), params)

    return add, engine.step


def _random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(length)]


def measure(
    add: Callable[[list[int], int], None],
    step: Callable[[], Any],
    batch: int,
    prompt_len: int,
    steps: int,
) -> list[float]:
    """Seconds of the timed steps (every step, or only those carrying a prompt)."""
    rng = random.Random(0)
    for _ in range(batch):
        add(_random_prompt(rng, rng.randrange(150, 350)), 1_000)
    for _ in range(WARMUP_STEPS):  # the batch's own prefills, then plain decodes
        step()
    times = []
    for k in range(steps):
        with_prompt = prompt_len > 0 and k % PROMPT_EVERY == 0
        if with_prompt:
            add(_random_prompt(rng, prompt_len), 1)
        started = time.perf_counter()
        step()
        elapsed = time.perf_counter() - started
        if prompt_len == 0 or with_prompt:
            times.append(elapsed)
    return times


def main() -> None:
    args = _parse_args()
    if args.system == "tandem":
        add, step = _tandem(args)
    else:
        add, step = _vllm(args)
    times = measure(add, step, args.batch, args.prompt_len, args.steps)
    print(json.dumps({"system": args.system, **summarize(times)}), flush=True)


if __name__ == "__main__":
    main()
