"""Turns a SchedulerOutput into tensors, runs the model, returns logits. Decides nothing."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.attention import AttentionBackend, AttentionBatch, BoundAttention
from engine.config import EngineConfig, ModelConfig
from engine.kernels.packed_linear import pack_linears, resolve_linear_kernel
from engine.kv.kv_cache import PagedKVCache
from engine.models.llama import LlamaForCausalLM
from engine.models.loader import load_block_weights, load_model
from engine.models.source import ModelSource
from engine.parallel import TensorParallelGroup, step_message
from engine.scheduler import ScheduledRequest, SchedulerOutput


def max_model_len(config: EngineConfig, cfg: ModelConfig) -> int:
    """The context an engine serves. Sliding-window attention is not implemented, so the
    context is capped at the window: within it, full attention is what the model computes."""
    limits = [config.max_model_len or cfg.max_position_embeddings, cfg.sliding_window]
    return min(x for x in limits if x)


def build_model(
    config: EngineConfig,
    source: ModelSource,
    cfg: ModelConfig,
    max_positions: int,
    rank: int = 0,
    size: int = 1,
) -> LlamaForCausalLM:
    """The model (tensor-parallel rank `rank` of `size`: its slice) on the configured
    linear kernel, with the fused operators wherever tandem's C++ kernels run."""
    model = load_model(source, config.torch_dtype, max_positions, rank, size)
    linear_kernel = resolve_linear_kernel(config.linear_kernel, config.torch_dtype)
    if linear_kernel != "torch":  # tandem's C++ kernels: linear layers and fused ops
        quantized = linear_kernel == "quantized"
        pack_linears(model, load_block_weights(source, cfg, rank, size) if quantized else None)
        model.use_fused_ops()
    return model


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        kv_cache: PagedKVCache,
        group: TensorParallelGroup | None = None,
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_cache = kv_cache
        self.group = group  # the driver of a tensor-parallel group: shards step along

    @torch.inference_mode()
    def execute(
        self, batch: SchedulerOutput, after_layer: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Runs one step; returns logits [num_sampled, V] of the `sample` requests, in order.

        `after_layer(i)` runs as soon as layer i has written its KV for the whole batch.
        """
        if self.group is not None:
            self.group.send(step_message(batch.scheduled))
        hidden = self.forward(batch.scheduled, after_layer)
        logit_rows, end = [], 0
        for item in batch.scheduled:
            end += len(item.token_ids)
            if item.sample:
                logit_rows.append(end - 1)
        return self.model.compute_logits(hidden[logit_rows])  # [N, V]

    @torch.inference_mode()
    def forward(
        self,
        scheduled: list[ScheduledRequest],
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """The step's hidden states [T, D]; its keys and values are in the cache."""
        input_ids: list[int] = []
        positions: list[int] = []
        for item in scheduled:
            input_ids.extend(item.token_ids)
            positions.extend(range(item.start_pos, item.start_pos + len(item.token_ids)))
        attention_batch = AttentionBatch(
            query_lens=[len(s.token_ids) for s in scheduled],
            context_lens=[s.start_pos + len(s.token_ids) for s in scheduled],
            block_tables=[s.block_ids for s in scheduled],
            block_size=self.kv_cache.block_size,
        )
        attention = BoundAttention(
            self.backend, self.kv_cache.layers, self.backend.plan(attention_batch)
        )
        return self.model(  # [T, D]
            torch.tensor(input_ids), torch.tensor(positions), attention, after_layer
        )
