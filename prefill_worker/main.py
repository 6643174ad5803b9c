"""Builds and starts a prefill instance from a WorkerSpec."""

from __future__ import annotations

from cluster.spec import WorkerSpec
from cluster.worker_base import start_server
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.kv.link import LinkManager, connect_store
from prefill_worker.service import Deadlines, PrefillService


def build(spec: WorkerSpec) -> PrefillService:
    engine = LLMEngine(EngineConfig(**spec.engine_kwargs()))
    links = LinkManager(spec.instance_id, connect_store(spec.store_address), host=spec.listen_host)
    service = PrefillService(
        engine, spec.instance_id, links, Deadlines(**spec.deadlines), spec.kv_layer_groups
    )
    start_server(service, spec.listen_host, spec.port)
    service.start()
    return service
