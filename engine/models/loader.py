"""Builds a LlamaForCausalLM from a ModelSource, in the engine's dtype.

Both formats are first read as Hugging Face names; `_copy_weights` then packs
q/k/v and gate/up into the fused projections the model uses. A tensor-parallel rank
(`rank` of `size`, engine/parallel.py) keeps its slice: rows of q/k/v and gate/up
(whole heads), columns of o_proj and down_proj; an o_proj bias is added by rank 0 only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from engine.config import ModelConfig
from engine.errors import UnsupportedModelError
from engine.models.gguf_format import BlockWeights, GGUFModel, concat_block_weights
from engine.models.hf_format import iter_hf_tensors, read_hf_config
from engine.models.llama import LlamaForCausalLM
from engine.models.source import ModelSource
from engine.parallel import shard_columns, shard_rows

_FUSED = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|gate|up)_proj\.(weight|bias)")
_QKV_ORDER = {"q": 0, "k": 1, "v": 2}
_GATE_UP_ORDER = {"gate": 0, "up": 1}
_ROW_PARALLEL = re.compile(r"layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.(weight|bias)")


def read_model_config(source: ModelSource) -> ModelConfig:
    if source.kind == "gguf":
        return GGUFModel(source.path).config()
    return read_hf_config(source.path)


def load_model(
    source: ModelSource, dtype: torch.dtype, max_positions: int, rank: int = 0, size: int = 1
) -> LlamaForCausalLM:
    if source.kind == "gguf":
        gguf = GGUFModel(source.path)
        cfg, tensors = gguf.config(), gguf.tensors()
    else:
        cfg, tensors = read_hf_config(source.path), iter_hf_tensors(source.path)
    if size > 1:
        tensors = (_shard(name, tensor, rank, size) for name, tensor in tensors)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions, size)
    model = model.to_empty(device="cpu")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope.build_tables()
    _copy_weights(model, tensors, dtype)
    return model.to(dtype).eval().requires_grad_(False)


def _shard(name: str, tensor: torch.Tensor, rank: int, size: int) -> tuple[str, torch.Tensor]:
    """Rank's slice of one checkpoint tensor (whole for the replicated ones)."""
    if _FUSED.fullmatch(name):
        return name, shard_rows(tensor, rank, size)
    if _ROW_PARALLEL.fullmatch(name):
        if name.endswith("bias"):
            return name, tensor if rank == 0 else torch.zeros_like(tensor)
        return name, shard_columns(tensor, rank, size)
    return name, tensor


def load_block_weights(
    source: ModelSource, cfg: ModelConfig, rank: int = 0, size: int = 1
) -> dict[str, BlockWeights]:
    """The model's linear layers whose weights the checkpoint stores block-quantized, by
    module name (a fused projection only where all its parts share one block layout; a
    tensor-parallel slice only where it cuts whole blocks). Empty for a safetensors
    checkpoint."""
    if source.kind != "gguf":
        return {}
    stored = GGUFModel(source.path).block_weights()
    if size > 1:
        sliced = {}
        for name, blocks in stored.items():
            if _FUSED.fullmatch(name):
                sliced[name] = blocks.rows(rank, size)
            elif _ROW_PARALLEL.fullmatch(name):
                part = blocks.columns(rank, size)
                if part is not None:
                    sliced[name] = part
            else:
                sliced[name] = blocks
        stored = sliced
    out: dict[str, BlockWeights] = {}
    fused_parts = {"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")}
    for layer in range(cfg.num_layers):
        for fused, parts in fused_parts.items():
            block = fused.split(".")[0]
            names = [f"layers.{layer}.{block}.{part}_proj.weight" for part in parts]
            if all(n in stored for n in names):
                joined = concat_block_weights([stored[n] for n in names])
                if joined is not None:
                    out[f"layers.{layer}.{fused}"] = joined
        for single in ("self_attn.o_proj", "mlp.down_proj"):
            name = f"layers.{layer}.{single}.weight"
            if name in stored:
                out[f"layers.{layer}.{single}"] = stored[name]
    head = "embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    if head in stored:
        out["lm_head"] = stored[head]
    return out


def _copy_weights(
    model: LlamaForCausalLM, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype
) -> None:
    params = dict(model.named_parameters())
    pending: dict[str, dict[int, torch.Tensor]] = {}
    loaded: set[str] = set()
    for name, tensor in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        match = _FUSED.fullmatch(name)
        if match:
            layer, block, part, kind = match.groups()
            fused = "qkv_proj" if block == "self_attn" else "gate_up_proj"
            target = f"layers.{layer}.{block}.{fused}.{kind}"
            order = _QKV_ORDER if block == "self_attn" else _GATE_UP_ORDER
            pending.setdefault(target, {})[order[part]] = tensor
            if len(pending[target]) == len(order):
                parts = pending.pop(target)
                _assign(params, target, torch.cat([parts[i] for i in range(len(order))]), dtype)
                loaded.add(target)
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        _assign(params, name, tensor, dtype)
        loaded.add(name)
    missing = (
        set(params) - loaded - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    )
    if missing or pending:
        raise UnsupportedModelError(
            f"the checkpoint lacks weights: {sorted(missing | set(pending))[:5]}"
        )


def _assign(
    params: dict[str, torch.nn.Parameter], name: str, tensor: torch.Tensor, dtype: torch.dtype
) -> None:
    if name not in params:
        raise UnsupportedModelError(f"unexpected weight {name!r} in the checkpoint")
    param = params[name]
    if param.shape != tensor.shape:
        raise UnsupportedModelError(
            f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(tensor.to(dtype))
