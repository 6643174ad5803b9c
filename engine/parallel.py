"""Tensor parallelism on CPU: one model instance split by heads across N processes.

    rank 0, the driver (LLMEngine: scheduler,        ranks 1..N-1, the shards
    sampler, KV manager, rank 0's slice)             (a slice of the model each)
      execute(batch) ──── broadcast the step ─────────▶ forward(step)
      forward(step)  ◀─── all-reduce after o_proj ────▶ forward(step)
                     ◀─── and after down_proj ────────▶
      logits, sampling

The split is Megatron's: rank r holds query heads [rH/N, (r+1)H/N), the KV heads
they read, and 1/N of the MLP's width; o_proj and down_proj sum their partial outputs
over the group. The embedding, the norms and the lm_head are whole on every rank.

The KV cache: each rank's slice of every layer lives in one file in shared memory,
which the driver maps too. Handoff and migration read and write whole heads there,
without involving the shards, and a layer listener reads a layer as soon as the
driver has finished it: by then the all-reduces of that layer have shown that every
rank wrote its keys and values. A group therefore lives on one node (a STRICT_PACK
placement group; see cluster/launcher.py).

Collectives run on gloo, over a TCPStore. The step a shard is told to run travels as
JSON (never pickle). A shard that loses its driver exits; a driver that loses a shard
raises TensorParallelError from then on, and its worker gives up the instance.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

from engine.config import EngineConfig, ModelConfig
from engine.errors import UnsupportedModelError
from engine.scheduler import ScheduledRequest

logger = logging.getLogger(__name__)

# Seconds one collective of a step may take before the group counts as broken.
STEP_TIMEOUT_S = 120.0
SHM_DIR = "/dev/shm"


class TensorParallelError(RuntimeError):
    """A rank of the group died or stopped answering: the instance cannot step again."""


def check_divisible(cfg: ModelConfig, size: int) -> None:
    """Raises UnsupportedModelError unless `size` ranks can split this model by heads."""
    if size == 1:
        return
    parts = {
        "query heads": cfg.num_heads,
        "KV heads": cfg.num_kv_heads,
        "MLP width": cfg.intermediate_size,
    }
    bad = {name: n for name, n in parts.items() if n % size}
    if bad:
        shape = ", ".join(f"{name} {n}" for name, n in parts.items())
        raise UnsupportedModelError(
            f"tensor_parallel_size={size} does not divide this model ({shape}); "
            f"choose a divisor of {cfg.num_kv_heads} KV heads that also divides the rest"
        )


def shard_rows(tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank's contiguous 1/size of dim 0 (a column-parallel weight or bias)."""
    step = tensor.shape[0] // size
    return tensor[rank * step : (rank + 1) * step]


def shard_columns(tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank's contiguous 1/size of dim 1 (a row-parallel weight)."""
    step = tensor.shape[1] // size
    return tensor[:, rank * step : (rank + 1) * step]


# ---- the group --------------------------------------------------------------------------


class TensorParallelGroup:
    """One rank's membership of its instance's group: collectives and the step channel."""

    def __init__(self, store: dist.Store, group_id: str, rank: int, size: int, host: str) -> None:
        from engine.kv.link import gloo_group

        self.rank, self.size, self.group_id = rank, size, group_id
        self.broken = ""
        # Two groups: steps wait for each other's ranks without end (an idle instance),
        # while the collectives inside a step have a deadline.
        self._control = gloo_group(store, f"tp/{group_id}/control/", rank, size, host, None)
        self._compute = gloo_group(store, f"tp/{group_id}/compute/", rank, size, host, None)

    def _run(self, start: Callable[[], dist.Work], what: str, timeout: float | None) -> None:
        """Starts a collective and waits for it; any failure, at the start or while
        waiting, breaks the group for good."""
        if self.broken:
            raise TensorParallelError(f"tensor-parallel group {self.group_id}: {self.broken}")
        try:
            work = start()
            if timeout is None:
                work.wait()
            else:
                work.wait(datetime.timedelta(seconds=timeout))
        except Exception as exc:
            self.broken = f"{what} failed on rank {self.rank}: {exc}"
            raise TensorParallelError(
                f"tensor-parallel group {self.group_id}: {self.broken}"
            ) from exc

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums `tensor` over the ranks, in place; bfloat16 is summed in float32."""
        total = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
        self._run(lambda: self._compute.allreduce([total]), "all-reduce", STEP_TIMEOUT_S)
        if total is not tensor:
            tensor.copy_(total)
        return tensor

    def barrier(self) -> None:
        self.all_reduce(torch.zeros(1))

    def send(self, message: dict[str, Any]) -> None:
        """The driver tells every shard what to do next."""
        payload = torch.frombuffer(bytearray(json.dumps(message).encode()), dtype=torch.uint8)
        length = torch.tensor([payload.numel()], dtype=torch.int64)
        self._run(lambda: self._control.broadcast(length, 0), "sending a step", STEP_TIMEOUT_S)
        self._run(lambda: self._control.broadcast(payload, 0), "sending a step", STEP_TIMEOUT_S)

    def receive(self) -> dict[str, Any]:
        """A shard waits for the driver's next message."""
        length = torch.zeros(1, dtype=torch.int64)
        self._run(lambda: self._control.broadcast(length, 0), "waiting for a step", None)
        payload = torch.empty(int(length.item()), dtype=torch.uint8)
        self._run(lambda: self._control.broadcast(payload, 0), "receiving a step", STEP_TIMEOUT_S)
        message: dict[str, Any] = json.loads(payload.numpy().tobytes())
        return message


def step_message(scheduled: Sequence[ScheduledRequest]) -> dict[str, Any]:
    return {
        "op": "step",
        "tokens": [s.token_ids for s in scheduled],
        "starts": [s.start_pos for s in scheduled],
        "blocks": [s.block_ids for s in scheduled],
    }


def step_from_message(message: dict[str, Any]) -> list[ScheduledRequest]:
    return [
        ScheduledRequest("", list(tokens), start, list(blocks), False)
        for tokens, start, blocks in zip(message["tokens"], message["starts"], message["blocks"])
    ]


# ---- the KV cache in shared memory ---------------------------------------------------------


def kv_file(group_id: str, rank: int) -> str:
    folder = SHM_DIR if os.path.isdir(SHM_DIR) else tempfile.gettempdir()
    return os.path.join(folder, f"tandem-kv-{group_id}-{rank}")


def map_kv_layers(
    path: str, num_layers: int, shape: Sequence[int], dtype: torch.dtype
) -> list[torch.Tensor]:
    """`num_layers` tensors of `shape` backed by the shared file at `path` (created, zero
    filled, when missing)."""
    per_layer = 1
    for n in shape:
        per_layer *= n
    flat = torch.from_file(path, shared=True, size=num_layers * per_layer, dtype=dtype)
    return [flat[i * per_layer : (i + 1) * per_layer].view(*shape) for i in range(num_layers)]


# ---- starting the shards --------------------------------------------------------------------


class ShardLauncher(Protocol):
    """Starts ranks 1..N-1 of a group, each running engine.shard.run_shard(config, rank)."""

    def start(self, config: EngineConfig, ranks: Sequence[int]) -> None: ...

    def dead(self) -> str:
        """Why a started shard is gone ("" while all live)."""
        ...

    def stop(self, graceful: bool) -> None:
        """Waits for the shards to end after a stop message (`graceful`), then kills any
        left; kills them at once otherwise."""
        ...


class ProcessShards:
    """Shards as child processes of the driver's (this machine; no Ray)."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, config: EngineConfig, ranks: Sequence[int]) -> None:
        text = json.dumps(dataclasses.asdict(config))
        for rank in ranks:
            env = dict(os.environ, OMP_NUM_THREADS=str(config.num_threads or 1))
            self.processes.append(
                subprocess.Popen([sys.executable, "-m", "engine.shard", text, str(rank)], env=env)
            )

    def dead(self) -> str:
        codes = [p.returncode for p in self.processes if p.poll() is not None]
        return f"a shard process exited with status {codes[0]}" if codes else ""

    def stop(self, graceful: bool) -> None:
        for process in self.processes:
            try:
                process.wait(10 if graceful else 0.1)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.processes.clear()


def new_group_id() -> str:
    return uuid.uuid4().hex[:12]


def _store(config: EngineConfig) -> dist.Store:
    from engine.kv.link import connect_store

    if not config.tp_store_address:
        raise ValueError("a shard of a tensor-parallel engine needs tp_store_address")
    return connect_store(config.tp_store_address)


def report_loaded(config: EngineConfig, rank: int, error: str = "") -> None:
    """A shard tells its driver it has loaded its slice, or why it could not."""
    store, key = _store(config), f"tp/{config.tp_group_id}/"
    if error:
        store.set(key + "failed", f"rank {rank}: {error}")
    else:
        store.set(key + f"loaded/{rank}", "1")


def wait_for_shards(
    config: EngineConfig, launcher: ShardLauncher, timeout: float = STEP_TIMEOUT_S * 5
) -> None:
    """The driver waits until every shard has loaded its slice; raises TensorParallelError
    with the reason if one failed or died first."""
    store, key = _store(config), f"tp/{config.tp_group_id}/"
    loaded = [key + f"loaded/{rank}" for rank in range(1, config.tensor_parallel_size)]
    deadline = time.monotonic() + timeout
    while not store.check(loaded):
        if store.check([key + "failed"]):
            why = store.get(key + "failed").decode()
            raise TensorParallelError(f"a shard failed to start: {why}")
        why = launcher.dead()
        if why:
            raise TensorParallelError(f"a shard failed to start: {why}")
        if time.monotonic() > deadline:
            raise TensorParallelError(f"the shards did not load their slices in {timeout:.0f} s")
        time.sleep(0.1)


def connect(config: EngineConfig, rank: int) -> TensorParallelGroup:
    return TensorParallelGroup(
        _store(config), config.tp_group_id, rank, config.tensor_parallel_size, config.tp_host
    )


class TensorParallelDriver:
    """Rank 0's side of a group: starts the other ranks (`shards`, default child
    processes) with a TCPStore to meet in, joins them, lays out the shared KV cache,
    notices a lost rank, and stops them."""

    def __init__(self, config: EngineConfig, shards: ShardLauncher | None = None) -> None:
        from engine.kv.link import start_store

        self._store, address = start_store(config.tp_host)
        self.config = dataclasses.replace(
            config, tp_store_address=address, tp_group_id=new_group_id()
        )
        self.shards = shards or ProcessShards()
        self.group: TensorParallelGroup | None = None
        self._next_check = 0.0
        self.shards.start(self.config, range(1, config.tensor_parallel_size))

    def join(self) -> TensorParallelGroup:
        """Waits for every shard to load its slice, then forms the group."""
        wait_for_shards(self.config, self.shards)
        self.group = connect(self.config, 0)
        return self.group

    def map_kv_cache(
        self, num_blocks: int, num_layers: int, shape: Sequence[int], dtype: torch.dtype
    ) -> list[list[torch.Tensor]]:
        """Every rank's KV slice [rank][layer], each layer of `shape` (with the rank's
        heads), in shared memory that the shards map too. Nothing stays on disk."""
        assert self.group is not None, "join() first"
        paths = [kv_file(self.config.tp_group_id, r) for r in range(self.group.size)]
        try:
            slices = [map_kv_layers(path, num_layers, shape, dtype) for path in paths]
            self.group.send({"op": "kv", "num_blocks": num_blocks})
            self.group.barrier()  # every shard has mapped its file
        finally:
            for path in paths:  # the mappings stay valid
                if os.path.exists(path):
                    os.unlink(path)
        return slices

    def check(self) -> None:
        """Raises TensorParallelError if a shard is gone. Looks at most once a second: an
        idle engine runs no collective that would notice."""
        now = time.monotonic()
        if self.group is None or now < self._next_check:
            return
        self._next_check = now + 1.0
        why = self.group.broken or self.shards.dead()
        if why:
            self.group.broken = why
            raise TensorParallelError(f"tensor-parallel group {self.group.group_id}: {why}")

    def close(self) -> None:
        """Tells the shards to stop and waits for them; kills them if the group broke."""
        graceful = self.group is not None and not self.group.broken
        if self.group is not None and graceful:
            try:
                self.group.send({"op": "stop"})
            except TensorParallelError:  # a shard is gone already
                graceful = False
        self.shards.stop(graceful)
        self.group = None
