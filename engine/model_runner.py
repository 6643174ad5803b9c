"""Turns a SchedulerOutput into tensors, runs the model, returns logits. Decides nothing."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.attention import AttentionBackend, AttentionBatch, BoundAttention
from engine.kv.kv_cache import PagedKVCache
from engine.models.llama import LlamaForCausalLM
from engine.scheduler import SchedulerOutput


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, backend: AttentionBackend, kv_cache: PagedKVCache
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_cache = kv_cache

    @torch.inference_mode()
    def execute(
        self, batch: SchedulerOutput, after_layer: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Runs one step; returns logits [num_sampled, V] of the `sample` requests, in order.

        `after_layer(i)` runs as soon as layer i has written its KV for the whole batch.
        """
        input_ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        for item in batch.scheduled:
            input_ids.extend(item.token_ids)
            positions.extend(range(item.start_pos, item.start_pos + len(item.token_ids)))
            if item.sample:
                logit_rows.append(len(input_ids) - 1)
        attention_batch = AttentionBatch(
            query_lens=[len(s.token_ids) for s in batch.scheduled],
            context_lens=[s.start_pos + len(s.token_ids) for s in batch.scheduled],
            block_tables=[s.block_ids for s in batch.scheduled],
            block_size=self.kv_cache.block_size,
        )
        attention = BoundAttention(
            self.backend, self.kv_cache.layers, self.backend.plan(attention_batch)
        )
        hidden = self.model(  # [T, D]
            torch.tensor(input_ids), torch.tensor(positions), attention, after_layer
        )
        return self.model.compute_logits(hidden[logit_rows])  # [N, V]
