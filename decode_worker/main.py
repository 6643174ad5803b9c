"""Builds and starts a decode (or colocated) instance from a WorkerSpec."""

from __future__ import annotations

from typing import Any

from cluster.spec import WorkerSpec
from cluster.worker_base import start_server
from decode_worker.service import DecodeService
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.kv.link import LinkManager, connect_store


def build(spec: WorkerSpec, shards: Any = None) -> DecodeService:
    """`shards`: how ranks 1..N-1 of a tensor-parallel engine start (engine.parallel's
    ShardLauncher; default: child processes)."""
    engine = LLMEngine(EngineConfig(**spec.engine_kwargs()), shards)
    links = LinkManager(spec.instance_id, connect_store(spec.store_address), host=spec.listen_host)
    service = DecodeService(engine, spec.instance_id, links, colocated=spec.role == "colocated")
    try:
        start_server(service, spec.listen_host, spec.port)
    except BaseException:
        engine.close()
        raise
    service.start()
    return service
