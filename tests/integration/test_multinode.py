"""A two-node Ray cluster on one machine: prefill on one node, decode on the other."""

from __future__ import annotations

from typing import Any

import pytest

from cluster.launcher import RayLauncher
from cluster.spec import WorkerSpec
from engine.kv.link import start_store
from tests.integration.serving import RouterThread, greedy_token_ids, wait_all_free

ray = pytest.importorskip("ray")


def start_head() -> Any:
    """A one-machine Ray cluster's head node. Ray gives its raylet 30 s to register; on
    a loaded 2-core machine that can run out, so one more try before giving up."""
    from ray.cluster_utils import Cluster

    for attempt in range(2):
        try:
            return Cluster(
                initialize_head=True,
                head_node_args={"num_cpus": 1, "resources": {"tandem_node_a": 1}},
            )
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt:
                raise
    raise AssertionError("unreachable")


def test_prefill_and_decode_on_different_nodes(prompts, reference_outputs):
    cluster = start_head()
    cluster.add_node(num_cpus=1, resources={"tandem_node_b": 1})
    cluster.wait_for_nodes()
    launcher = None
    try:
        ray.init(address=cluster.address)
        store, address = start_store()  # kept alive: the links rendezvous in it
        specs = [
            WorkerSpec("prefill-0", "prefill", address, dtype="float32", node="tandem_node_a"),
            WorkerSpec("decode-0", "decode", address, dtype="float32", node="tandem_node_b"),
        ]
        launcher = RayLauncher()
        prefill, decode = launcher.start(specs)
        assert prefill.node_id != decode.node_id
        with RouterThread([prefill.address, decode.address]) as router:
            chosen = [0, 7, 15]
            results = greedy_token_ids(router.url, [prompts[i] for i in chosen], 32)
            assert results == [reference_outputs[i] for i in chosen]
            statuses = wait_all_free([prefill.address, decode.address])
        assert statuses[0].kv_bytes_sent > 0
        assert statuses[1].kv_bytes_received == statuses[0].kv_bytes_sent
        assert all(s.num_free_blocks == s.num_blocks for s in statuses)
        del store
    finally:
        if launcher is not None:
            launcher.shutdown()
        ray.shutdown()
        cluster.shutdown()
