"""Builds and starts a prefill instance from a WorkerSpec."""

from __future__ import annotations

from typing import Any

from cluster.spec import WorkerSpec
from cluster.worker_base import start_server
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.kv.link import LinkManager, connect_store
from engine.loop import EngineLoop
from prefill_worker.service import Deadlines, PrefillService


def build(spec: WorkerSpec, shards: Any = None) -> PrefillService:
    """`shards`: how ranks 1..N-1 of a tensor-parallel engine start (engine.parallel's
    ShardLauncher; default: child processes)."""
    loop = EngineLoop.spawn(lambda: LLMEngine(EngineConfig(**spec.engine_kwargs()), shards))
    engine = loop.engine
    links = LinkManager(spec.instance_id, connect_store(spec.store_address), host=spec.listen_host)
    service = PrefillService(
        engine, spec.instance_id, links, Deadlines(**spec.deadlines), spec.kv_layer_groups, loop
    )
    try:
        start_server(service, spec.listen_host, spec.port)
    except BaseException:
        loop.stop()
        raise
    service.start()
    return service
