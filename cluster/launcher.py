"""Starting workers: as Ray actors (the default) or as plain local processes.

Both launchers take WorkerSpecs and return WorkerHandles once every worker serves
its gRPC address. The worker code is imported by module name inside the worker's
own process, so this module needs no model code, and Ray only when it is used.

Ray: each worker is an actor with explicit CPU/GPU resources and a fixed number of
torch threads. `pack=True` places all of them in one STRICT_PACK placement group
(one node); a spec's `node` pins a worker to the node offering that custom resource.
A tensor-parallel instance (spec.tensor_parallel N > 1) gets N bundles on one node:
in the packed group, or else in a STRICT_PACK group of its own. Its worker actor
(rank 0) takes the first and starts ranks 1..N-1 as ShardActors in the others
(RayShards); they are its children, so they die with it, and a worker Ray restarts
starts new ones.
A worker without a host listens on its node's address. When a worker's process dies,
Ray starts it again, up to `max_restarts` times; it serves on its old address again
(cluster.worker_main.start), so the router finds it there and registers it anew.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from cluster.spec import WorkerSpec
from cluster.worker_main import READY

# Seconds the Ray driver waits for a new head node's GCS to publish its port.
GCS_WAIT_VARIABLE = "RAY_gcs_server_port_wait_time_s"


class LaunchError(RuntimeError):
    """A worker failed to start; the message carries its own error output."""


class WorkerHandle(Protocol):
    spec: WorkerSpec
    address: str

    def alive(self) -> bool: ...

    def kill(self) -> None: ...


# ---- local processes -------------------------------------------------------------------------


@dataclass
class ProcessWorker:
    spec: WorkerSpec
    process: subprocess.Popen[str]
    address: str = ""
    log: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


class LocalLauncher:
    """Workers as child processes of this one, for machines without Ray."""

    def __init__(self) -> None:
        self.workers: list[ProcessWorker] = []

    def start(self, specs: list[WorkerSpec], timeout: float = 600.0) -> list[ProcessWorker]:
        started = [self._spawn(spec) for spec in specs]
        self.workers.extend(started)
        deadline = time.monotonic() + timeout
        for worker in started:
            self._wait_ready(worker, deadline)
        return started

    def _spawn(self, spec: WorkerSpec) -> ProcessWorker:
        env = dict(os.environ, OMP_NUM_THREADS=str(spec.num_threads))
        process = subprocess.Popen(
            [sys.executable, "-m", "cluster.worker_main", spec.to_json()],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        return ProcessWorker(spec, process)

    def _wait_ready(self, worker: ProcessWorker, deadline: float) -> None:
        ready = threading.Event()

        def read() -> None:
            assert worker.process.stdout is not None
            for line in worker.process.stdout:
                if line.startswith(READY) and not ready.is_set():
                    worker.address = line.split()[1]
                    ready.set()
                else:
                    worker.log.append(line.rstrip())
                    del worker.log[:-200]
            ready.set()

        threading.Thread(target=read, name=f"log-{worker.spec.instance_id}", daemon=True).start()
        ready.wait(max(0.0, deadline - time.monotonic()))
        if not worker.address:
            worker.kill()
            tail = "\n".join(worker.log[-30:])
            raise LaunchError(f"worker {worker.spec.instance_id} did not start:\n{tail}")

    def shutdown(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers.clear()


# ---- Ray ---------------------------------------------------------------------------------------


@dataclass
class RayWorker:
    spec: WorkerSpec
    actor: Any
    address: str = ""
    node_id: str = ""

    def alive(self) -> bool:
        import ray

        try:
            ray.get(self.actor.ping.remote(), timeout=10)
            return True
        except Exception:
            return False

    def kill(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)


def _actor_class() -> Any:
    import ray

    @ray.remote
    class WorkerActor:
        """One worker in an actor process; its gRPC server runs on the actor's threads."""

        def __init__(self, spec_json: str) -> None:
            self.spec = WorkerSpec.from_json(spec_json)
            self.service: Any = None
            if ray.get_runtime_context().was_current_actor_reconstructed:
                self.start(restarted=True)  # Ray restarted it: its old process died

        def start(self, restarted: bool = False) -> tuple[str, str]:
            from cluster.worker_main import start

            shards = RayShards(self.spec) if self.spec.tensor_parallel > 1 else None
            self.service = start(self.spec, ray.util.get_node_ip_address(), restarted, shards)
            return self.service.address, ray.get_runtime_context().get_node_id()

        def ping(self) -> int:
            return os.getpid()

        def stop(self) -> None:
            if self.service is not None:
                self.service.stop()

    return WorkerActor


def _shard_actor_class() -> Any:
    import ray

    @ray.remote
    class ShardActor:
        """Rank 1..N-1 of a tensor-parallel instance: engine.shard.run_shard."""

        def run(self, config_json: str, rank: int) -> None:
            import json

            from engine.config import EngineConfig
            from engine.parallel import TensorParallelError
            from engine.shard import run_shard

            with contextlib.suppress(TensorParallelError):  # the driver is gone
                run_shard(EngineConfig(**json.loads(config_json)), rank)

    return ShardActor


class RayShards:
    """engine.parallel's ShardLauncher for a worker actor: the other ranks of its
    instance as actors in its placement group's bundles `spec.shard_bundles`."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.actors: list[Any] = []
        self.runs: list[Any] = []

    def start(self, config: Any, ranks: Any) -> None:
        import dataclasses
        import json

        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = ray.util.get_current_placement_group()
        if group is None or len(self.spec.shard_bundles) != len(ranks):
            raise LaunchError(
                f"worker {self.spec.instance_id}: a tensor-parallel instance needs a placement "
                f"group with a bundle for each of its {len(ranks)} other ranks"
            )
        actor_class = _shard_actor_class()
        text = json.dumps(dataclasses.asdict(config))
        for rank, bundle in zip(ranks, self.spec.shard_bundles):
            actor = actor_class.options(
                num_cpus=self.spec.num_cpus,
                name=f"tandem-{self.spec.instance_id}-rank{rank}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, bundle),
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(self.spec.num_threads)}},
            ).remote()
            self.actors.append(actor)
            self.runs.append(actor.run.remote(text, rank))

    def dead(self) -> str:
        import ray

        ended, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        for ref in ended:
            try:
                ray.get(ref)
                return "a shard actor returned before its group formed"
            except Exception as exc:
                return f"a shard actor failed: {exc}"
        return ""

    def stop(self, graceful: bool) -> None:
        import ray

        if self.runs and graceful:
            ray.wait(self.runs, num_returns=len(self.runs), timeout=10)
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self.actors.clear()
        self.runs.clear()


class RayLauncher:
    """Workers as Ray actors, on a Ray cluster at `address` or a new local one."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        import ray

        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            if address is None:
                # A busy small machine can take longer than Ray's default 30 s to bring up
                # the new cluster's GCS; wait longer rather than fail the launch.
                os.environ.setdefault(GCS_WAIT_VARIABLE, "120")
            ray.init(
                address=address,
                num_cpus=num_cpus if address is None else None,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        self.workers: list[RayWorker] = []
        self._placement_groups: list[Any] = []

    @property
    def node_address(self) -> str:
        """This process's node's address, as the other nodes reach it."""
        import ray

        return str(ray.util.get_node_ip_address())

    def start(
        self,
        specs: list[WorkerSpec],
        timeout: float = 600.0,
        pack: bool = False,
        max_restarts: int = 0,
    ) -> list[RayWorker]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_class = _actor_class()
        strategy: list[Any] = [None] * len(specs)
        specs = list(specs)
        # Which specs share a group: all of them packed, else each tensor-parallel one alone.
        members = [list(range(len(specs)))] if pack else [
            [i] for i, spec in enumerate(specs) if spec.tensor_parallel > 1
        ]  # fmt: skip
        for indices in members:
            bundles: list[dict[str, float]] = []
            first_bundle: dict[int, int] = {}  # spec index -> its worker's bundle
            for i in indices:
                first_bundle[i] = len(bundles)
                bundles.extend(_bundle(specs[i]) for _ in range(specs[i].tensor_parallel))
                shards = list(range(first_bundle[i] + 1, len(bundles)))
                specs[i] = dataclasses.replace(specs[i], shard_bundles=shards)
            group = ray.util.placement_group(bundles, strategy="STRICT_PACK")
            self._placement_groups.append(group)
            try:
                ray.get(group.ready(), timeout=timeout)
            except Exception as exc:
                names = [specs[i].instance_id for i in indices]
                raise LaunchError(
                    f"Ray could not reserve {bundles} on one node for {names}: {exc}"
                ) from exc
            for i, bundle in first_bundle.items():
                strategy[i] = PlacementGroupSchedulingStrategy(group, bundle)
        started = []
        for spec, scheduling in zip(specs, strategy):
            options: dict[str, Any] = {
                "num_cpus": spec.num_cpus,
                "num_gpus": spec.num_gpus,
                "name": f"tandem-{spec.instance_id}",
                "max_restarts": max_restarts,
                "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(spec.num_threads)}},
            }
            if spec.node:
                options["resources"] = {spec.node: 0.001}
            if scheduling is not None:
                options["scheduling_strategy"] = scheduling
            started.append(RayWorker(spec, actor_class.options(**options).remote(spec.to_json())))
        refs = [worker.actor.start.remote() for worker in started]
        try:
            results = ray.get(refs, timeout=timeout)
        except Exception as exc:
            for worker in started:
                worker.kill()
            raise LaunchError(f"Ray workers did not start: {exc}") from exc
        for worker, (address, node_id) in zip(started, results):
            worker.address, worker.node_id = address, node_id
        self.workers.extend(started)
        return started

    def shutdown(self) -> None:
        import ray

        for worker in self.workers:
            with contextlib.suppress(Exception):  # already gone
                worker.kill()
        self.workers.clear()
        for group in self._placement_groups:
            ray.util.remove_placement_group(group)
        self._placement_groups.clear()
        if self._started_ray:
            ray.shutdown()


def _bundle(spec: WorkerSpec) -> dict[str, float]:
    bundle = {"CPU": spec.num_cpus}
    if spec.num_gpus:
        bundle["GPU"] = spec.num_gpus
    if spec.node:  # the worker asks for it: its bundle must hold it
        bundle[spec.node] = 0.001
    return bundle
