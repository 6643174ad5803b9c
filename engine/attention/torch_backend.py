"""The reference attention backend: plain torch, correct on CPU for any batch mix.

Requests with one new token (decodes, or a 1-token chunk) are attended in one
batched call over their gathered, padded contexts. Requests with several new
tokens (prefill chunks) are attended one by one: a chunk with no earlier
context uses the new keys directly with a causal mask; a later chunk gathers
its blocks and uses a causal mask offset by the tokens already cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, AttentionBatch, build_paged_indices


@dataclass(frozen=True)
class _Chunk:
    start: int  # first token of the chunk in the flat batch
    num_tokens: int
    context_len: int
    block_ids: torch.Tensor  # [num_blocks] int64; empty when there is no earlier context
    mask: torch.Tensor | None  # [num_tokens, context_len] bool, True = attend


@dataclass(frozen=True)
class TorchPlan:
    k_rows: torch.Tensor  # [T] rows of the cache viewed as [NB*2*BS, KVH, D]
    v_rows: torch.Tensor  # [T]
    single_token_ids: torch.Tensor  # [S] batch rows of the one-token requests
    single_tables: torch.Tensor  # [S, max_blocks] int64, padded with block 0
    single_mask: torch.Tensor  # [S, 1, 1, max_blocks * BS] bool
    single_context_lens: torch.Tensor  # [S] int64
    chunks: list[_Chunk]

    @property
    def all_single(self) -> bool:
        """Every request has one new token (a decode step): batch row i is request i."""
        return not self.chunks


class TorchAttention(AttentionBackend):
    name = "torch"

    def plan(self, batch: AttentionBatch) -> TorchPlan:
        bs = batch.block_size
        indices = build_paged_indices(batch)
        slots = indices.slot_mapping
        k_rows = (slots // bs) * (2 * bs) + slots % bs
        single_rows: list[int] = []
        single_tables: list[list[int]] = []
        single_lens: list[int] = []
        chunks: list[_Chunk] = []
        start = 0
        for q_len, ctx_len, table in zip(batch.query_lens, batch.context_lens, batch.block_tables):
            num_blocks = (ctx_len + bs - 1) // bs
            if q_len == 1:
                single_rows.append(start)
                single_tables.append(table[:num_blocks])
                single_lens.append(ctx_len)
            else:
                chunks.append(_make_chunk(start, q_len, ctx_len, table[:num_blocks]))
            start += q_len
        max_blocks = max((len(t) for t in single_tables), default=0)
        padded = [t + [0] * (max_blocks - len(t)) for t in single_tables]
        key_pos = torch.arange(max_blocks * bs)
        lens = torch.tensor(single_lens, dtype=torch.int64)
        return TorchPlan(
            k_rows=k_rows,
            v_rows=k_rows + bs,
            single_token_ids=torch.tensor(single_rows, dtype=torch.int64),
            single_tables=torch.tensor(padded, dtype=torch.int64).view(len(padded), max_blocks),
            single_mask=(key_pos[None, :] < lens[:, None])[:, None, None, :],
            single_context_lens=lens,
            chunks=chunks,
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        plan: TorchPlan,
    ) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KVH, D]; kv_cache: [NB, 2, BS, KVH, D]
        rows = kv_cache.view(-1, self.num_kv_heads, self.head_dim)  # [NB*2*BS, KVH, D]
        rows.index_copy_(0, plan.k_rows, k)
        rows.index_copy_(0, plan.v_rows, v)
        if plan.all_single:  # no gather of q, no scatter of the output
            return self._single_tokens(q, kv_cache, plan)
        out = torch.empty_like(q)
        if plan.single_token_ids.numel():
            out[plan.single_token_ids] = self._single_tokens(q, kv_cache, plan)
        for chunk in plan.chunks:
            end = chunk.start + chunk.num_tokens
            out[chunk.start : end] = self._chunk(q[chunk.start : end], k, v, kv_cache, chunk)
        return out

    def _single_tokens(
        self, q: torch.Tensor, kv_cache: torch.Tensor, plan: TorchPlan
    ) -> torch.Tensor:
        num_seqs = plan.single_tables.shape[0]
        group = self.num_heads // self.num_kv_heads
        # Grouped-query attention by regrouping the queries: the G query heads that share
        # a KV head become G query rows of it, so each KV head is read once and SDPA runs
        # without expanding K and V (several times faster in bfloat16 on CPU).
        queries = q if plan.all_single else q[plan.single_token_ids]
        qs = queries.view(num_seqs, self.num_kv_heads, group, self.head_dim)
        keys = kv_cache[:, 0][plan.single_tables]  # [S, MB, BS, KVH, D]
        values = kv_cache[:, 1][plan.single_tables]
        length = keys.shape[1] * keys.shape[2]
        keys = keys.view(num_seqs, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        values = values.view(num_seqs, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(qs, keys, values, attn_mask=plan.single_mask)
        out = out.view(num_seqs, self.num_heads, 1, self.head_dim)
        return out.squeeze(2)  # [S, H, D]

    def _chunk(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        chunk: _Chunk,
    ) -> torch.Tensor:
        qs = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        keys, values = (
            t.transpose(0, 1).unsqueeze(0) for t in self._context(k, v, kv_cache, chunk)
        )
        if chunk.mask is None:  # no earlier context: plain causal attention
            out = F.scaled_dot_product_attention(qs, keys, values, is_causal=True, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(
                qs, keys, values, attn_mask=chunk.mask, enable_gqa=True
            )
        return out.squeeze(0).transpose(0, 1)  # [n, H, D]

    def _context(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, chunk: _Chunk
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values a chunk attends over, [C, KVH, D] each: the chunk's own
        when it has no earlier context, else the whole context from its blocks."""
        if chunk.mask is None:
            end = chunk.start + chunk.num_tokens
            return k[chunk.start : end], v[chunk.start : end]
        keys = kv_cache[chunk.block_ids, 0].reshape(-1, self.num_kv_heads, self.head_dim)
        values = kv_cache[chunk.block_ids, 1].reshape(-1, self.num_kv_heads, self.head_dim)
        return keys[: chunk.context_len], values[: chunk.context_len]


def _make_chunk(start: int, q_len: int, ctx_len: int, block_ids: list[int]) -> _Chunk:
    if ctx_len == q_len:
        return _Chunk(start, q_len, ctx_len, torch.empty(0, dtype=torch.int64), None)
    # Query i sits at position ctx_len - q_len + i and sees keys 0..that position.
    query_pos = torch.arange(ctx_len - q_len, ctx_len)
    mask = torch.arange(ctx_len)[None, :] <= query_pos[:, None]
    return _Chunk(start, q_len, ctx_len, torch.tensor(block_ids, dtype=torch.int64), mask)
