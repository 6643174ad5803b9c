"""The router's settings: timeouts, admission bounds, load polling and SLO classes."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from router.metrics import SLO


@dataclass(frozen=True)
class RouterConfig:
    router_id: str = field(default_factory=lambda: f"router-{uuid.uuid4().hex[:12]}")
    connect_timeout_s: float = 30.0  # start(): each worker's Info and first token stream
    rpc_timeout_s: float = 10.0  # Generate, Abort and Status calls
    reconnect_backoff_s: tuple[float, float] = (0.1, 5.0)  # first and longest wait
    max_message_bytes: int = 64 << 20  # Info carries the tokenizer: several MB
    # Admission: beyond either bound a new request is refused (HTTP 429) instead of
    # queueing without limit on the workers.
    max_in_flight: int = 1024  # requests on the workers
    max_waiting_prompt_tokens: int = 65536  # prompt tokens not yet answered by a first token
    migration_timeout_s: float = 120.0  # one live migration, all its stages
    # A request whose worker died (its token stream broke, or it stopped answering) is
    # resumed on another instance this many times at most before it fails.
    max_retries: int = 2
    # On SIGTERM (serve(handle_sigterm=True)): no new requests, /ready 503, and the
    # requests in flight get this long to finish before the router shuts down.
    drain_timeout_s: float = 30.0
    # The migration scheduler (cluster.migration_policy): "off" or "balance", run every
    # migration_interval_s on the decode instances' loads.
    migration_policy: str = "off"
    migration_interval_s: float = 1.0
    migration_threshold: float = 0.2  # the load gap (fraction of KV blocks) worth a move
    load_poll_interval_s: float = 0.5  # each worker's Status: load for routing and metrics
    load_max_age_s: float = 5.0  # an older load is unknown to the policies
    slo_classes: Mapping[str, SLO] = field(
        default_factory=lambda: {"default": SLO(ttft_s=1.0, tpot_s=0.1)}
    )
