"""The CPU backend: the torch backend with its decode path replaced by a C++ kernel.

Requests with one new token are attended by `torch.ops.tandem.decode_attention`
(csrc/decode_attention.cpp), which reads each request's keys and values in place
from its blocks. The torch backend instead gathers every context into a padded
copy per layer and runs masked SDPA over it; at batch 32 that gather and SDPA
were two thirds of a decode step. Prefill chunks take the torch path unchanged.
"""

from __future__ import annotations

import torch

from engine.attention.torch_backend import TorchAttention, TorchPlan
from engine.kernels import cpu_kernels


class CpuAttention(TorchAttention):
    name = "cpu"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim)
        cpu_kernels.load()  # builds on this machine's first use; KernelBuildError says why not
        self.scale = head_dim**-0.5

    def _single_tokens(
        self, q: torch.Tensor, kv_cache: torch.Tensor, plan: TorchPlan
    ) -> torch.Tensor:
        # q: [T, H, D]; kv_cache: [NB, 2, BS, KVH, D] -> [S, H, D]
        return torch.ops.tandem.decode_attention(
            q[plan.single_token_ids], kv_cache, plan.single_tables,
            plan.single_context_lens, self.scale,
        )  # fmt: skip
