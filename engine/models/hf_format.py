"""Reading a Hugging Face directory: config.json into ModelConfig, safetensors into tensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine.config import ROPE_KINDS, ModelConfig, RopeScaling
from engine.errors import UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def read_hf_config(model_dir: Path) -> ModelConfig:
    raw: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} in {model_dir}/config.json is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if raw.get("mlp_bias"):
        raise UnsupportedModelError("models with mlp_bias=true are not supported")
    num_heads = raw["num_attention_heads"]
    rope_theta, scaling = _rope(raw)
    sliding_window = raw.get("sliding_window")
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        sliding_window = None
    return ModelConfig(
        architecture=model_type,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        attention_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
        output_bias=model_type == "llama" and bool(raw.get("attention_bias", False)),
        rope_scaling=scaling,
        sliding_window=sliding_window,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(model_dir, raw),
    )


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling]:
    # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older
    # files write `rope_theta` and an optional `rope_scaling`.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ROPE_KINDS:
        raise UnsupportedModelError(
            f"RoPE scaling {kind!r} is not supported; supported: {', '.join(ROPE_KINDS)}"
        )
    if kind == "default":
        return theta, RopeScaling()
    return theta, RopeScaling(
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
    )


def _eos_ids(model_dir: Path, raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def iter_hf_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (Hugging Face name without the `model.` prefix, tensor)."""
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name.removeprefix("model."), f.get_tensor(name)
