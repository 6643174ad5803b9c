"""Ranks 1..N-1 of a tensor-parallel engine (engine/parallel.py): a slice of the model
and of the KV cache, stepping when the driver says, deciding nothing.

    python -m engine.shard ENGINE_CONFIG_JSON RANK     (engine.parallel.ProcessShards)
"""

from __future__ import annotations

import json
import logging
import sys

import torch

from engine.attention import get_backend
from engine.config import EngineConfig
from engine.kv.kv_cache import PagedKVCache
from engine.model_runner import ModelRunner, build_model, max_model_len
from engine.models.loader import read_model_config
from engine.models.source import resolve_model
from engine.parallel import (
    TensorParallelError,
    connect,
    kv_file,
    map_kv_layers,
    report_loaded,
    step_from_message,
)

logger = logging.getLogger(__name__)


class ShardEngine:
    def __init__(self, config: EngineConfig, rank: int) -> None:
        torch.set_num_threads(config.num_threads or 1)
        self.config, self.rank = config, rank
        size = config.tensor_parallel_size
        try:
            source = resolve_model(config.model)
            cfg = read_model_config(source)
            model = build_model(config, source, cfg, max_model_len(config, cfg), rank, size)
        except Exception as exc:
            report_loaded(config, rank, f"{type(exc).__name__}: {exc}")
            raise
        report_loaded(config, rank)
        self.group = connect(config, rank)
        model.set_all_reduce(self.group.all_reduce)
        message = self.group.receive()  # {"op": "kv", "num_blocks": n}: the driver made it
        backend_cls = get_backend(config.attention_backend)
        backend = backend_cls(cfg.num_heads // size, cfg.num_kv_heads // size, cfg.head_dim)
        shape = backend_cls.kv_cache_shape(
            message["num_blocks"], config.block_size, cfg.num_kv_heads // size, cfg.head_dim
        )
        path = kv_file(config.tp_group_id, rank)
        layers = map_kv_layers(path, cfg.num_layers, shape, config.torch_dtype)
        self.group.barrier()  # mapped: the driver may unlink the file
        self.runner = ModelRunner(model, backend, PagedKVCache(layers, config.block_size))

    def serve(self) -> None:
        while True:
            message = self.group.receive()
            if message["op"] == "stop":
                return
            self.runner.forward(step_from_message(message))

    def close(self) -> None:
        logger.info("shard %d of group %s done", self.rank, self.config.tp_group_id)


def run_shard(config: EngineConfig, rank: int) -> None:
    """Rank `rank` of the group: loads its slice of the model, then runs every step the
    driver sends until told to stop. TensorParallelError once the driver is gone."""
    shard = ShardEngine(config, rank)
    try:
        shard.serve()
    finally:
        shard.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s shard {sys.argv[2]} %(message)s")
    config = EngineConfig(**json.loads(sys.argv[1]))
    try:
        run_shard(config, int(sys.argv[2]))
    except TensorParallelError as exc:
        logger.warning("the group ended: %s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
