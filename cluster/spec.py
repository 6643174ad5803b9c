"""What a launcher needs to start one worker: plain fields, sent as JSON (never pickle)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

ROLES = ("prefill", "decode", "colocated")
# The module whose build(spec) makes each role's service.
ROLE_MODULES = {
    "prefill": "prefill_worker.main",
    "decode": "decode_worker.main",
    "colocated": "decode_worker.main",
}


@dataclass
class WorkerSpec:
    instance_id: str
    role: str
    store_address: str  # host:port of the state store (a TCPStore)
    model: str | None = None
    dtype: str = "auto"  # "auto": resolved where the worker runs (engine.config)
    num_threads: int = 1
    num_cpus: float = 1.0  # Ray resources
    num_gpus: float = 0.0
    host: str | None = "127.0.0.1"  # None: this node's own address (see worker_main.start)
    port: int = 0  # 0: any free port
    max_num_batched_tokens: int = 512
    kv_cache_memory_bytes: int = 1 << 30
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    linear_kernel: str = "auto"
    max_model_len: int | None = None
    deadlines: dict[str, float] = field(default_factory=dict)  # prefill: reserve/transfer/...
    kv_layer_groups: int = 3  # prefill: the final chunk's KV leaves in this many layer groups
    node: str | None = None  # Ray: a custom resource name that pins the worker to a node
    # Processes that share the model by heads, on one node (engine/parallel.py); each
    # reserves num_cpus and runs num_threads. Ray: the placement group bundles of ranks
    # 1..N-1 (rank 0, this worker, has its own), set by the launcher.
    tensor_parallel: int = 1
    shard_bundles: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be at least 1, got {self.tensor_parallel}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)

    @property
    def listen_host(self) -> str:
        """The host it listens on, once cluster.worker_main.start has resolved None."""
        if self.host is None:
            raise ValueError(f"worker {self.instance_id}: its host is not resolved yet")
        return self.host

    def engine_kwargs(self) -> dict[str, Any]:
        """The EngineConfig fields this spec sets ("auto" values resolved on this machine)."""
        from engine.config import resolve_dtype

        return {
            "model": self.model,
            "dtype": resolve_dtype(self.dtype),
            "num_threads": self.num_threads,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "kv_cache_memory_bytes": self.kv_cache_memory_bytes,
            "num_blocks": self.num_blocks,
            "enable_prefix_caching": self.enable_prefix_caching,
            "attention_backend": self.attention_backend,
            "linear_kernel": self.linear_kernel,
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": self.tensor_parallel,
            "tp_host": self.listen_host,
        }
