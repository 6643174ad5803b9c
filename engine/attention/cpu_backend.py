"""The CPU backend: the torch backend with its decode path replaced by a C++ kernel.

Requests with one new token are attended by `torch.ops.tandem.decode_attention`
(csrc/decode_attention.cpp), which reads each request's keys and values in place
from its blocks. The torch backend instead gathers every context into a padded
copy per layer and runs masked SDPA over it; at batch 32 that gather and SDPA
were two thirds of a decode step.

Prefill chunks in bfloat16, on a CPU with AVX512_BF16 but no AMX tiles, are attended
by `torch.ops.tandem.prefill_attention` (csrc/prefill_attention.cpp): both products on
the packed linear kernel's bfloat16 micro-kernel, where torch's CPU flash attention
ran at about a sixth of the rate (AMD EPYC). With AMX tiles (`amx_bf16`), torch's
SDPA multiplies on the tiles and is the faster one, about 3x (512 queries over 1,024
keys: 2.1 against 6.1 ms, Intel Xeon), so chunks take the torch path there, as they
do in float32.
"""

from __future__ import annotations

import torch

from engine.attention.torch_backend import TorchAttention, TorchPlan, _Chunk
from engine.kernels import cpu_kernels


class CpuAttention(TorchAttention):
    name = "cpu"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim)
        cpu_kernels.load()  # builds on this machine's first use; KernelBuildError says why not
        self.scale = head_dim**-0.5
        self.bf16_prefill = (
            bool(torch.ops.tandem.bf16_pairs())
            and head_dim % 16 == 0
            and not cpu_kernels.cpu_has("amx_bf16")
        )

    def _single_tokens(
        self, q: torch.Tensor, kv_cache: torch.Tensor, plan: TorchPlan
    ) -> torch.Tensor:
        # q: [T, H, D]; kv_cache: [NB, 2, BS, KVH, D] -> [S, H, D]
        queries = q if plan.all_single else q[plan.single_token_ids]
        return torch.ops.tandem.decode_attention(
            queries, kv_cache, plan.single_tables,
            plan.single_context_lens, self.scale,
        )  # fmt: skip

    def _chunk(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        chunk: _Chunk,
    ) -> torch.Tensor:
        if not (self.bf16_prefill and q.dtype == torch.bfloat16):
            return super()._chunk(q, k, v, kv_cache, chunk)
        keys, values = self._context(k, v, kv_cache, chunk)
        return torch.ops.tandem.prefill_attention(q, keys, values, self.scale)
