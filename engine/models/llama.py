"""A Llama-family decoder: Llama, Mistral, Qwen2 (q/k/v bias) and SmolLM2.

The model knows nothing of serving. It runs a flat batch of tokens from many
requests; `attention` is a callable (one step's attention, bound to the KV
cache and the step's plan) that writes the new keys and values into the paged
cache and attends over each request's context.

With `tp_size` N > 1 the model is one rank's slice (engine/parallel.py): 1/N of the
heads and of the MLP width; `set_all_reduce` gives it the sum over the group that
follows o_proj and down_proj.

`use_fused_ops()` switches float32 and bfloat16 steps to tandem's fused C++ operators
(csrc/fused_ops.cpp: residual add + RMSNorm, RoPE in place on the q/k/v
projection, SiLU-gated product); the math is the same, in a few operators a layer
instead of ~25.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.models.rope import RotaryEmbedding, apply_rope

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: each [T, 1, Dh]
AllReduce = Callable[[torch.Tensor], torch.Tensor]  # sums over a tensor-parallel group
FUSED_DTYPES = (torch.float32, torch.bfloat16)  # what csrc/fused_ops.cpp computes


class StepAttention(Protocol):
    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] -> [T, H, D]."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused_ops = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, as the reference implementations do.
        if self.fused_ops and x.dtype in FUSED_DTYPES:
            return torch.ops.tandem.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp_size: int = 1) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads // tp_size
        self.num_kv_heads = cfg.num_kv_heads // tp_size
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        # q, k and v share one matmul; their rows are stacked in that order.
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.output_bias)
        self.fused_ops = False
        self.all_reduce: AllReduce | None = None

    def forward(self, x: torch.Tensor, rope: Rope, attention: StepAttention) -> torch.Tensor:
        # x: [T, D]
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, Q + 2KV]
        fused = self.fused_ops and qkv.dtype in FUSED_DTYPES
        if fused:  # q and k rotated in place
            cos, sin = (t.view(num_tokens, self.head_dim) for t in rope)
            torch.ops.tandem.rope_qkv_(
                qkv, cos, sin, self.num_heads, self.num_kv_heads, self.head_dim
            )
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if not fused:
            q, k = apply_rope(q, k, *rope)
        out = attention(self.layer_idx, q, k, v)  # [T, H, Dh]
        out = self.o_proj(out.reshape(num_tokens, self.q_size))
        return out if self.all_reduce is None else self.all_reduce(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_size: int = 1) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size // tp_size
        # gate and up share one matmul: rows [0, I) are gate, [I, 2I) are up.
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, cfg.hidden_size, bias=False)
        self.fused_ops = False
        self.all_reduce: AllReduce | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused_ops and gate_up.dtype in FUSED_DTYPES:
            gated = torch.ops.tandem.silu_mul(gate_up)
        else:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            gated = F.silu(gate) * up
        out = self.down_proj(gated)
        return out if self.all_reduce is None else self.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp_size: int = 1) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, tp_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp_size)

    def forward(self, x: torch.Tensor, rope: Rope, attention: StepAttention) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, attention)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(
        self,
        residual: torch.Tensor,
        normed: torch.Tensor,
        next_norm: RMSNorm | None,
        rope: Rope,
        attention: StepAttention,
    ) -> torch.Tensor:
        """forward() on the fused operators: `residual` (x) is updated in place, `normed`
        is input_layernorm(x); returns next_norm of the layer's output (None: no norm)."""
        attended = self.self_attn(normed, rope, attention)
        norm = self.post_attention_layernorm
        normed = torch.ops.tandem.add_rms_norm_(residual, attended, norm.weight, norm.eps)
        out = self.mlp(normed)
        if next_norm is None:
            return residual.add_(out)
        return torch.ops.tandem.add_rms_norm_(residual, out, next_norm.weight, next_norm.eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, tp_size: int = 1) -> None:
        super().__init__()
        self.config = cfg
        self.tp_size = tp_size
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp_size) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.fused_ops = False

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: StepAttention,
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden states [T, D]
        x = self.embed_tokens(input_ids)
        rope = self.rope.lookup(positions, x.dtype)
        if self.fused_ops and x.dtype in FUSED_DTYPES:
            return self._forward_fused(x, rope, attention, after_layer)
        for index, layer in enumerate(self.layers):
            x = layer(x, rope, attention)
            if after_layer is not None:  # this layer's KV is in the cache
                after_layer(index)
        return x

    def _forward_fused(
        self,
        x: torch.Tensor,
        rope: Rope,
        attention: StepAttention,
        after_layer: Callable[[int], None] | None,
    ) -> torch.Tensor:
        layers = [cast(DecoderLayer, layer) for layer in self.layers]
        normed = layers[0].input_layernorm(x)
        for index, layer in enumerate(layers):
            next_norm = layers[index + 1].input_layernorm if index + 1 < len(layers) else None
            normed = layer.forward_fused(x, normed, next_norm, rope, attention)
            if after_layer is not None:  # this layer's KV is in the cache
                after_layer(index)
        return x

    def use_fused_ops(self, enabled: bool = True) -> None:
        """Steps on tandem's fused C++ operators (they must be loaded)."""
        for module in self.modules():
            if isinstance(module, (LlamaForCausalLM, Attention, MLP, RMSNorm)):
                module.fused_ops = enabled

    def set_all_reduce(self, all_reduce: AllReduce) -> None:
        """The sum over the tensor-parallel group this slice belongs to."""
        for module in self.modules():
            if isinstance(module, (Attention, MLP)):
                module.all_reduce = all_reduce

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, D] -> logits [N, V] in the model's dtype; the sampler widens them to
        # float32 where it does more than take each row's maximum
        return self.lm_head(self.norm(hidden))
