"""vLLM's offline throughput on the benchmark's prompts; run by offline_throughput.py.

Runs inside vLLM's own venv (see setup_vllm.sh), so it imports nothing from tandem.
Reads the prompts (a JSON list of token-id lists), times only `LLM.generate`
(not the engine's start-up), and writes one JSON object to --out.

    python benchmarks/vllm_offline.py --model DIR --prompts P.json --out R.json \
        [--dtype bfloat16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Hugging Face safetensors directory")
    parser.add_argument("--prompts", type=Path, required=True, help="JSON list of token-id lists")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    return parser.parse_args()


def _engine_knobs(llm: Any) -> dict[str, Any]:
    """The scheduler settings vLLM resolved, for the report."""
    config = llm.llm_engine.vllm_config
    return {
        "max_num_seqs": config.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "enforce_eager": config.model_config.enforce_eager,
        "compilation_mode": str(getattr(config.compilation_config, "mode", None)),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import LLM, SamplingParams  # imported here: the import alone takes seconds

    prompt_ids: list[list[int]] = json.loads(args.prompts.read_text())
    started = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        enable_prefix_caching=False,  # random prompts share nothing; the warm-up must not be reused
        seed=0,
    )
    startup_s = time.perf_counter() - started
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0)
    llm.generate([{"prompt_token_ids": prompt_ids[0]}], params, use_tqdm=False)  # warm-up
    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed_s = time.perf_counter() - started
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "status": "ok",
        "dtype": args.dtype,
        "startup_s": startup_s,
        "elapsed_s": elapsed_s,
        "num_prompt_tokens": sum(len(ids) for ids in prompt_ids),
        "num_output_tokens": num_output,
        "first_output_ids": list(outputs[0].outputs[0].token_ids[:16]),
        "engine": _engine_knobs(llm),
        "vllm_version": _version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def _version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def main() -> None:
    args = _parse_args()
    try:
        result = run(args)
    except Exception as exc:  # the caller records why vLLM could not run this dtype
        result = {"status": "error", "dtype": args.dtype, "error": f"{type(exc).__name__}: {exc}"}
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
