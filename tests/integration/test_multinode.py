"""`tandem serve --config FILE --ray-address auto` on a two-node Ray cluster on one machine.

Each node offers one CPU and each worker asks for one, so the prefill worker and the
decode worker run on different nodes (different raylets). The workers listen on their
node's address, not on loopback. Then the decode worker's process is killed with
SIGKILL: Ray starts it again (ray.max_restarts), it serves on its old address, the router
registers it anew, and requests give the same tokens as before.

With a tensor-parallel prefill instance (3 processes of one CPU each, on nodes of three
CPUs), its placement group puts all three ranks on one node, and the decode worker on
the other. A rank killed with SIGKILL takes its instance down; Ray starts the instance
again, with new ranks, and it serves the same tokens.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.serving import (
    greedy_token_ids,
    metric_samples,
    tandem_serve,
    wait_all_free,
)

ray = pytest.importorskip("ray")

CONFIG = """\
dtype: float32
mode: disaggregated
pools:
  prefill: {instances: 1, resources: {cpus: 1, threads: 1}}
  decode: {instances: 1, resources: {cpus: 1, threads: 1}}
store: {kind: memory, heartbeat_ttl_s: 2}
ray: {launcher: ray, address: null, max_restarts: 1}
"""


# Two Ray nodes on this machine, one CPU each, in a process of their own: a Ray head
# started from the test process (threads of earlier tests' gRPC channels, gigabytes of
# models) was seen to never bring up its GCS.
CLUSTER = """
import sys
from ray.cluster_utils import Cluster
cpus = int(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus})
cluster.add_node(num_cpus=cpus)
cluster.wait_for_nodes()
print("RAY_ADDRESS", cluster.address, flush=True)
sys.stdin.read()  # until the test closes it
cluster.shutdown()
"""


@contextlib.contextmanager
def two_node_cluster(cpus_per_node: int = 1) -> Iterator[str]:
    """The cluster's address. Ray gives a new head 30 s to come up, which a loaded
    2-core machine can miss: one more try before giving up."""
    for attempt in range(2):
        process = subprocess.Popen(
            [sys.executable, "-c", CLUSTER, str(cpus_per_node)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert process.stdout is not None and process.stdin is not None
        output = []
        for line in process.stdout:  # ends when the process does
            if line.startswith("RAY_ADDRESS "):
                break
            output.append(line)
        else:
            process.wait()
            if attempt:
                pytest.fail("the Ray cluster did not start:\n" + "".join(output[-30:]))
            continue
        try:
            yield line.split()[1]
        finally:
            process.stdin.close()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        return


def serving_process(port: int) -> psutil.Process:
    """The process listening on `port` (a worker's gRPC port)."""
    for connection in psutil.net_connections("tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
            assert connection.pid is not None
            return psutil.Process(connection.pid)
    raise AssertionError(f"nothing listens on port {port}")


def registry_events(url: str) -> dict[str, float]:
    samples = metric_samples(url, ["tandem:registry_events_total"])
    return {k.split('"')[1]: v for k, v in samples.items()}


def test_serve_on_a_two_node_ray_cluster_and_a_killed_worker_comes_back(
    prompts, reference_outputs, tmp_path: Path
) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(CONFIG)
    node_address = ray.util.get_node_ip_address()
    with two_node_cluster() as ray_address, tandem_serve(
        "--config", str(config), "--ray-address", "auto",
        env={"RAY_ADDRESS": ray_address}, ready_path="/ready",
    ) as (url, _):  # fmt: skip
        instances = httpx.get(f"{url}/admin/instances", timeout=10).json()["instances"]
        addresses = {i["role"]: i["address"] for i in instances}
        assert sorted(addresses) == ["decode", "prefill"]
        for address in addresses.values():
            assert address.rpartition(":")[0] == node_address, addresses  # not loopback
        prefill = serving_process(int(addresses["prefill"].rpartition(":")[2]))
        decode = serving_process(int(addresses["decode"].rpartition(":")[2]))
        assert prefill.parent().pid != decode.parent().pid  # two raylets: two nodes

        chosen = [0, 7, 15]
        results = greedy_token_ids(url, [prompts[i] for i in chosen], 32)
        assert results == [reference_outputs[i] for i in chosen]
        before = registry_events(url)

        decode.kill()  # SIGKILL: Ray starts the actor again, once (max_restarts: 1)
        decode.wait(30)
        deadline = time.monotonic() + 180
        while registry_events(url)["registered"] == before["registered"]:
            assert time.monotonic() < deadline, "the restarted decode worker never registered"
            time.sleep(1)
        assert registry_events(url)["expired"] == before["expired"] + 1
        while httpx.get(f"{url}/ready", timeout=10).status_code != 200:  # its token stream
            assert time.monotonic() < deadline, "the restarted decode worker never got ready"
            time.sleep(0.5)
        restarted = serving_process(int(addresses["decode"].rpartition(":")[2]))
        assert restarted.pid != decode.pid

        results = greedy_token_ids(url, [prompts[i] for i in chosen], 32)
        assert results == [reference_outputs[i] for i in chosen]
        statuses = wait_all_free([addresses["prefill"], addresses["decode"]])
        assert all(s.num_free_blocks == s.num_blocks for s in statuses)
        assert statuses[1].kv_bytes_received > 0  # the new process got its KV over a link


TP_CONFIG = """\
dtype: float32
mode: disaggregated
pools:
  prefill: {instances: 1, tensor_parallel: 3, resources: {cpus: 1, threads: 1}}
  decode: {instances: 1, resources: {cpus: 1, threads: 1}}
store: {kind: memory, heartbeat_ttl_s: 2}
ray: {launcher: ray, address: null, max_restarts: 1}
"""


def ranks_of(worker: psutil.Process) -> list[psutil.Process]:
    """The shard processes of a tensor-parallel worker: Ray actors it started."""
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if any("ShardActor" in part for part in p.info["cmdline"] or [])
        and p.is_running()
        and p.status() != psutil.STATUS_ZOMBIE
    ]


def test_a_tensor_parallel_instance_runs_in_one_placement_group_and_comes_back(
    prompts, reference_outputs, tmp_path: Path
) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(TP_CONFIG)
    with two_node_cluster(cpus_per_node=3) as ray_address, tandem_serve(
        "--config", str(config), "--ray-address", "auto",
        env={"RAY_ADDRESS": ray_address}, ready_path="/ready",
    ) as (url, _):  # fmt: skip
        instances = httpx.get(f"{url}/admin/instances", timeout=10).json()["instances"]
        addresses = {i["role"]: i["address"] for i in instances}
        assert {i["role"]: i["tensor_parallel"] for i in instances} == {
            "prefill": 3,
            "decode": 1,
        }
        prefill = serving_process(int(addresses["prefill"].rpartition(":")[2]))
        decode = serving_process(int(addresses["decode"].rpartition(":")[2]))
        shards = ranks_of(prefill)
        assert len(shards) == 2
        # One placement group, one node: the three ranks under one raylet; decode elsewhere.
        assert {s.parent().pid for s in shards} == {prefill.parent().pid}
        assert decode.parent().pid != prefill.parent().pid

        chosen = [0, 7, 15]
        results = greedy_token_ids(url, [prompts[i] for i in chosen], 32)
        assert results == [reference_outputs[i] for i in chosen]
        before = registry_events(url)

        shards[0].kill()  # one rank lost: the instance gives up, and Ray starts it again
        prefill.wait(60)
        deadline = time.monotonic() + 240
        while registry_events(url)["registered"] == before["registered"]:
            assert time.monotonic() < deadline, "the restarted prefill instance never registered"
            time.sleep(1)
        while httpx.get(f"{url}/ready", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the restarted prefill instance never got ready"
            time.sleep(0.5)
        restarted = serving_process(int(addresses["prefill"].rpartition(":")[2]))
        assert restarted.pid != prefill.pid
        new_shards = ranks_of(restarted)
        assert len(new_shards) == 2 and not {s.pid for s in new_shards} & {s.pid for s in shards}
        assert {s.parent().pid for s in new_shards} == {restarted.parent().pid}

        results = greedy_token_ids(url, [prompts[i] for i in chosen], 32)
        assert results == [reference_outputs[i] for i in chosen]
        statuses = wait_all_free([addresses["prefill"], addresses["decode"]])
        assert all(s.num_free_blocks == s.num_blocks for s in statuses)
