"""The attention backend interface, and the per-step plan every backend starts from.

KV layout (FlashInfer's "NHD" paged layout), one tensor per layer:

    kv_cache[layer]: [num_blocks, 2, block_size, num_kv_heads, head_dim]
                                  ^ 0 = keys, 1 = values

A step's batch is described in CSR form, as FlashInfer's `plan()` takes it.
For request i of the batch (half-open ranges):

    | array            | range for request i              | meaning                          |
    |------------------|----------------------------------|----------------------------------|
    | qo_indptr        | [qo_indptr[i], qo_indptr[i+1])   | its new tokens in the flat batch |
    | kv_indptr        | [kv_indptr[i], kv_indptr[i+1])   | its block ids within kv_indices  |
    | kv_last_page_len | [i]                              | tokens in its last block (1..BS) |
    | context_lens     | [i]                              | cached + new tokens              |

`slot_mapping[t]` is where token t's key/value go: block_id * block_size + offset.

Contract of a backend, for each layer call during a step:
  before: `plan(batch)` was called once for this step; q, k, v hold the new
          tokens in batch order; the cache holds every earlier token of each request.
  after:  the new keys/values are written to their slots, and the output row of
          each new token attends causally over its request's whole context.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class AttentionBatch:
    """One step's requests, in batch order."""

    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    block_size: int


@dataclass(frozen=True)
class PagedIndices:
    """The batch in CSR form (see the module docstring). All int32 except slot_mapping."""

    qo_indptr: torch.Tensor  # [B + 1]
    kv_indptr: torch.Tensor  # [B + 1]
    kv_indices: torch.Tensor  # [sum of blocks]
    kv_last_page_len: torch.Tensor  # [B]
    context_lens: torch.Tensor  # [B]
    slot_mapping: torch.Tensor  # [T] int64


def build_paged_indices(batch: AttentionBatch) -> PagedIndices:
    bs = batch.block_size
    qo_indptr, kv_indptr = [0], [0]
    kv_indices: list[int] = []
    last_lens: list[int] = []
    slots: list[int] = []
    for q_len, ctx_len, table in zip(batch.query_lens, batch.context_lens, batch.block_tables):
        num_blocks = (ctx_len + bs - 1) // bs
        qo_indptr.append(qo_indptr[-1] + q_len)
        kv_indptr.append(kv_indptr[-1] + num_blocks)
        kv_indices.extend(table[:num_blocks])
        last_lens.append(ctx_len - (num_blocks - 1) * bs)
        slots.extend(table[pos // bs] * bs + pos % bs for pos in range(ctx_len - q_len, ctx_len))
    i32 = torch.int32
    return PagedIndices(
        qo_indptr=torch.tensor(qo_indptr, dtype=i32),
        kv_indptr=torch.tensor(kv_indptr, dtype=i32),
        kv_indices=torch.tensor(kv_indices, dtype=i32),
        kv_last_page_len=torch.tensor(last_lens, dtype=i32),
        context_lens=torch.tensor(batch.context_lens, dtype=i32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
    )


class AttentionBackend(ABC):
    """One attention implementation over the paged KV layout above."""

    name: ClassVar[str]

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    @staticmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (num_blocks, 2, block_size, num_kv_heads, head_dim)

    @abstractmethod
    def plan(self, batch: AttentionBatch) -> Any:
        """Builds this step's plan from the block tables. Called once per step."""

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, plan: Any
    ) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D]; writes k/v to the cache; returns [T, H, D]."""


class BoundAttention:
    """One step's attention: a backend bound to the KV cache and the step's plan.

    This is the callable the model receives; the model never sees blocks or plans.
    """

    def __init__(self, backend: AttentionBackend, kv_caches: list[torch.Tensor], plan: Any) -> None:
        self.backend = backend
        self.kv_caches = kv_caches
        self.plan = plan

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        return self.backend.forward(q, k, v, self.kv_caches[layer_idx], self.plan)
