"""One serving deployment: the state store, the worker pools, and how they were launched.

    Deployment(options).start()  ->  state store (this process) + workers (Ray or local)
    .addresses                   ->  the workers' gRPC addresses, for the router
    .stop()                      ->  workers stopped, Ray shut down if we started it

Disaggregated mode runs `prefill_instances` prefill workers and `decode_instances`
decode workers; colocated mode runs `decode_instances` workers that do both phases.
The state store is a torch.distributed TCPStore hosted here: KV links rendezvous in it.

Where things listen: `host` when given, for the store and every worker. Otherwise, on a
Ray cluster (`ray_address`) each worker listens on its own node's address and the store
on this node's; on this machine alone (local processes, or a Ray started here), all on
127.0.0.1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from cluster.spec import WorkerSpec
from cluster.worker_main import LOOPBACK

logger = logging.getLogger(__name__)

MODES = ("disaggregated", "colocated")
LAUNCHERS = ("ray", "local")


@dataclass
class DeploymentOptions:
    mode: str = "disaggregated"
    prefill_instances: int = 1
    decode_instances: int = 1
    # Processes per instance, splitting the model by heads on one node (engine/parallel.py).
    prefill_tensor_parallel: int = 1
    decode_tensor_parallel: int = 1
    model: str | None = None
    dtype: str = "auto"
    launcher: str = "ray"
    ray_address: str | None = None
    host: str | None = None  # None: see the module docstring
    max_restarts: int = 3  # Ray: times a worker whose process died is started again
    threads_per_worker: int = 1
    cpus_per_worker: float = 1.0
    max_num_batched_tokens: int = 512
    kv_cache_memory_bytes: int = 1 << 30
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    linear_kernel: str = "auto"
    # Ray: all workers in one STRICT_PACK placement group, on one node. None: pack when
    # Ray runs on this machine alone (no ray_address), so the workers share its cores.
    pack: bool | None = None
    deadlines: dict[str, float] = field(default_factory=dict)
    # Prefill: a prompt's final chunk ships its KV in this many groups of layers while
    # the step computes, so only the last group is left once the first token is out.
    kv_layer_groups: int = 3
    start_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"--launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.max_restarts < 0:
            raise ValueError("max_restarts must be 0 or more")
        if self.kv_layer_groups < 1:
            raise ValueError("kv_layer_groups must be at least 1")
        if self.decode_instances < 1:
            raise ValueError("--decode-instances must be at least 1")
        if min(self.prefill_tensor_parallel, self.decode_tensor_parallel) < 1:
            raise ValueError("--prefill/decode-tensor-parallel must be at least 1")
        if self.mode == "disaggregated" and self.prefill_instances < 1:
            raise ValueError("--prefill-instances must be at least 1 in disaggregated mode")

    @property
    def on_ray_cluster(self) -> bool:
        """Workers may run on other machines: they and the store need reachable addresses."""
        return self.launcher == "ray" and self.ray_address is not None

    def worker_specs(self, store_address: str) -> list[WorkerSpec]:
        host = self.host if self.host or self.on_ray_cluster else LOOPBACK
        common: dict[str, Any] = {
            "store_address": store_address,
            "model": self.model,
            "dtype": self.dtype,
            "num_threads": self.threads_per_worker,
            "num_cpus": self.cpus_per_worker,
            "host": host,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "kv_cache_memory_bytes": self.kv_cache_memory_bytes,
            "num_blocks": self.num_blocks,
            "enable_prefix_caching": self.enable_prefix_caching,
            "attention_backend": self.attention_backend,
            "linear_kernel": self.linear_kernel,
        }
        if self.mode == "colocated":
            return [
                WorkerSpec(
                    f"colocated-{i}",
                    "colocated",
                    tensor_parallel=self.decode_tensor_parallel,
                    **common,
                )
                for i in range(self.decode_instances)
            ]
        prefill = [
            WorkerSpec(
                f"prefill-{i}",
                "prefill",
                deadlines=dict(self.deadlines),
                kv_layer_groups=self.kv_layer_groups,
                tensor_parallel=self.prefill_tensor_parallel,
                **common,
            )
            for i in range(self.prefill_instances)
        ]
        decode = [
            WorkerSpec(
                f"decode-{i}", "decode", tensor_parallel=self.decode_tensor_parallel, **common
            )
            for i in range(self.decode_instances)
        ]
        return prefill + decode


class Deployment:
    def __init__(self, options: DeploymentOptions) -> None:
        self.options = options
        self.store: Any = None
        self.store_address = ""
        self.launcher: Any = None
        self.workers: list[Any] = []

    @property
    def addresses(self) -> list[str]:
        return [worker.address for worker in self.workers]

    def start(self) -> list[str]:
        options = self.options
        if options.launcher == "ray":
            from cluster.launcher import RayLauncher

            self.launcher = RayLauncher(options.ray_address)
            self._start_store(self.launcher.node_address)
            pack = options.pack if options.pack is not None else options.ray_address is None
            self.workers = self.launcher.start(
                options.worker_specs(self.store_address),
                options.start_timeout,
                pack=pack,
                max_restarts=options.max_restarts,
            )
        else:
            from cluster.launcher import LocalLauncher

            self.launcher = LocalLauncher()
            self._start_store(LOOPBACK)
            specs = options.worker_specs(self.store_address)
            self.workers = self.launcher.start(specs, options.start_timeout)
        logger.info("workers: %s", {w.spec.instance_id: w.address for w in self.workers})
        return self.addresses

    def _start_store(self, node_address: str) -> None:
        from engine.kv.link import start_store  # torch.distributed's TCPStore

        options = self.options
        host = options.host or (node_address if options.on_ray_cluster else LOOPBACK)
        self.store, self.store_address = start_store(host)

    def stop(self) -> None:
        if self.launcher is not None:
            self.launcher.shutdown()
            self.launcher = None
        self.workers = []
