"""Builds and starts a decode (or colocated) instance from a WorkerSpec."""

from __future__ import annotations

from cluster.spec import WorkerSpec
from cluster.worker_base import start_server
from decode_worker.service import DecodeService
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.kv.link import LinkManager, connect_store


def build(spec: WorkerSpec) -> DecodeService:
    engine = LLMEngine(EngineConfig(**spec.engine_kwargs()))
    links = LinkManager(spec.instance_id, connect_store(spec.store_address), host=spec.listen_host)
    service = DecodeService(engine, spec.instance_id, links, colocated=spec.role == "colocated")
    start_server(service, spec.listen_host, spec.port)
    service.start()
    return service
