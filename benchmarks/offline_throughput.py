"""Offline throughput: tandem against transformers and vLLM on identical weights and prompts.

64 requests of exactly 256 random prompt tokens (fixed seed) and 64 output tokens
each (greedy, EOS ignored), all submitted at once, measured in the same run for
  tandem        `LLM.generate` on the exported model directory;
  transformers  `generate`, batched (left padding), greedy, min_new_tokens=max_new_tokens;
  vLLM          `vllm.LLM.generate` in vLLM's own venv (vllm_offline.py, a subprocess).
Only generation is timed, never start-up; each system gets one untimed warm-up call.

    python benchmarks/offline_throughput.py [--dtype both|float32|bfloat16] [--out PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from bench_common import (
    RESULTS_DIR,
    load_average,
    machine_info,
    random_prompts,
    time_once,
    warn_if_busy,
    write_json,
)
from export_model import DEFAULT_OUT, ensure_exported

from benchmarks.serving.systems import find_vllm_venv, vllm_env

NUM_THREADS = 2
SYSTEMS = ("tandem", "transformers", "vllm")


def throughput(
    system: str, dtype: str, seconds: float, prompts: list[list[int]], outputs: list[list[int]]
) -> dict[str, Any]:
    return _report(
        system, dtype, seconds, sum(map(len, prompts)), sum(map(len, outputs)), outputs[0]
    )


def _report(
    system: str, dtype: str, seconds: float, num_prompt: int, num_output: int, first_ids: list[int]
) -> dict[str, Any]:
    return {
        "system": system,
        "dtype": dtype,
        "status": "ok",
        "elapsed_s": seconds,
        "num_prompt_tokens": num_prompt,
        "num_output_tokens": num_output,
        "output_tok_s": num_output / seconds,
        "total_tok_s": (num_prompt + num_output) / seconds,
        "first_output_ids": first_ids[:16],
        "loadavg": load_average(),
    }


def _failure(system: str, dtype: str, error: str) -> dict[str, Any]:
    return {"system": system, "dtype": dtype, "status": "error", "error": error}


# ---- the three systems -------------------------------------------------------------------


def run_tandem(
    model_dir: Path, dtype: str, prompts: list[list[int]], args: argparse.Namespace
) -> dict[str, Any]:
    from tandem import LLM, SamplingParams

    llm = LLM(
        model=str(model_dir), dtype=dtype, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False, num_threads=NUM_THREADS,
    )  # fmt: skip
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate(
        random_prompts(2, 16, llm.engine.model_config.vocab_size, seed=99), params
    )  # warm-up
    results: list[Any] = []
    seconds = time_once(lambda: results.extend(llm.generate(prompts, params)))
    report = throughput("tandem", dtype, seconds, prompts, [list(r.token_ids) for r in results])
    report["max_num_batched_tokens"] = args.max_num_batched_tokens
    return report


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, L], padded on the left as decoder-only generation needs."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _hf_generate(
    model: Any, prompts: list[list[int]], output_len: int, pad_id: int
) -> list[list[int]]:
    ids, mask = _left_pad(prompts, pad_id)
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=output_len,
        min_new_tokens=output_len, pad_token_id=pad_id,
    )  # fmt: skip
    return out[:, ids.shape[1] :].tolist()


def run_transformers(
    model_dir: Path, dtype: str, prompts: list[list[int]], args: argparse.Namespace
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    pad_id = model.generation_config.pad_token_id or 0
    batch = args.hf_batch_size
    outputs: list[list[int]] = []

    def generate_all() -> None:
        for start in range(0, len(prompts), batch):
            outputs.extend(
                _hf_generate(model, prompts[start : start + batch], args.output_len, pad_id)
            )

    with torch.inference_mode():
        _hf_generate(model, prompts[:2], 4, pad_id)  # warm-up
        seconds = time_once(generate_all)
    report = throughput("transformers", dtype, seconds, prompts, outputs)
    report["batch_size"] = batch
    return report


def _vllm_subprocess(
    venv: Path, model_dir: Path, dtype: str, prompts: list[list[int]], output_len: int
) -> dict[str, Any]:
    """Runs vllm_offline.py in vLLM's venv; returns its JSON, or a failure naming the log."""
    log_path = RESULTS_DIR / "raw" / f"vllm_{dtype}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prompts_path, out_path = Path(tmp) / "prompts.json", Path(tmp) / "result.json"
        prompts_path.write_text(json.dumps(prompts))
        command = [
            str(venv / "bin" / "python"), str(Path(__file__).with_name("vllm_offline.py")),
            "--model", str(model_dir), "--dtype", dtype, "--prompts", str(prompts_path),
            "--out", str(out_path), "--max-tokens", str(output_len),
        ]  # fmt: skip
        with log_path.open("w") as log:
            subprocess.run(
                command,
                env={**os.environ, **vllm_env(venv, f"0-{NUM_THREADS - 1}", kv_cache_gb=4)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not out_path.is_file():
            return {"status": "error", "error": f"vLLM wrote no result; see {log_path}"}
        return json.loads(out_path.read_text())


def run_vllm(
    model_dir: Path, dtype: str, prompts: list[list[int]], args: argparse.Namespace
) -> dict[str, Any]:
    try:
        venv = find_vllm_venv(args.vllm_venv)
    except RuntimeError as error:
        return _failure("vllm", dtype, str(error))
    raw = _vllm_subprocess(venv, model_dir, dtype, prompts, args.output_len)
    if raw["status"] != "ok":
        return _failure("vllm", dtype, raw["error"])
    num_prompt = sum(map(len, prompts))
    report = _report(
        "vllm",
        dtype,
        raw["elapsed_s"],
        num_prompt,
        raw["num_output_tokens"],
        raw["first_output_ids"],
    )
    report.update(startup_s=raw["startup_s"], engine=raw["engine"], loadavg=raw["loadavg"])
    return report


RUNNERS = {"tandem": run_tandem, "transformers": run_transformers, "vllm": run_vllm}


# ---- the comparison ----------------------------------------------------------------------


def _common_prefix(a: dict[str, Any], b: dict[str, Any]) -> int:
    """How many leading output ids of the first request two systems agree on (of 16)."""
    n = 0
    for x, y in zip(a["first_output_ids"], b["first_output_ids"], strict=False):
        if x != y:
            break
        n += 1
    return n


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per dtype: tandem's output tok/s over each other system's, and their greedy agreement."""
    ok = {(r["system"], r["dtype"]): r for r in results if r["status"] == "ok"}
    table: dict[str, dict[str, float]] = {}
    for (system, dtype), r in ok.items():
        tandem = ok.get(("tandem", dtype))
        if system != "tandem" and tandem is not None:
            row = table.setdefault(dtype, {})
            row[f"tandem/{system}"] = tandem["output_tok_s"] / r["output_tok_s"]
            row[f"{system} greedy ids agreeing"] = _common_prefix(tandem, r)
    return table


def print_table(results: list[dict[str, Any]], ratio_table: dict[str, dict[str, float]]) -> None:
    header = f"{'system':<13} {'dtype':<9} {'seconds':>8} {'out tok/s':>10} {'total tok/s':>12}"
    print(f"\n{header}  loadavg")
    for r in results:
        if r["status"] != "ok":
            print(f"{r['system']:<13} {r['dtype']:<9} failed: {r['error'][:200]}")
            continue
        print(
            f"{r['system']:<13} {r['dtype']:<9} {r['elapsed_s']:>8.2f} {r['output_tok_s']:>10.1f} "
            f"{r['total_tok_s']:>12.1f}  {r['loadavg']}"
        )
    for dtype, row in ratio_table.items():
        print(f"{dtype}: " + ", ".join(f"{name} = {value:.3g}" for name, value in row.items()))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["both", "float32", "bfloat16"], default="both")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "offline_throughput.json")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=64, help="transformers batch size")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=512, help="tandem's step budget"
    )
    parser.add_argument(
        "--vllm-venv", type=Path, default=None, help="default: .venv-vllm, /work/vllm-venv"
    )
    return parser.parse_args()


def save(args: argparse.Namespace, started: list[float], results: list[dict[str, Any]]) -> None:
    """Writes what has been measured so far, so an interrupted run keeps its results."""
    meta = {**machine_info(), "loadavg_start": started, "loadavg_end": load_average()}
    meta["argv"] = sys.argv[1:]
    write_json(args.out, {"meta": meta, "config": vars(args),
                          "results": results, "ratios": ratios(results)})  # fmt: skip


def main() -> None:
    args = parse_args()
    torch.set_num_threads(NUM_THREADS)
    warn_if_busy()
    model_dir = ensure_exported(args.model_dir)
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = random_prompts(args.num_prompts, args.prompt_len, vocab_size, seed=0)
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    started, results = load_average(), []
    for dtype in dtypes:
        for system in args.systems:
            print(f"[{dtype}] {system}", flush=True)
            results.append(RUNNERS[system](model_dir, dtype, prompts, args))
            save(args, started, results)
            gc.collect()
    print_table(results, ratios(results))


if __name__ == "__main__":
    main()
