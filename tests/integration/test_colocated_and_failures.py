"""Colocated mode gives the same tokens; a decode worker killed mid-transfer loses nothing.

Both use the local-process launcher (the path for machines without Ray).
"""

from __future__ import annotations

import threading
import time

import httpx

from cluster.deployment import Deployment, DeploymentOptions
from cluster.launcher import LocalLauncher
from tests.integration.serving import (
    RouterThread,
    greedy_token_ids,
    wait_all_free,
    worker_status,
)

MAX_TOKENS = 32


def test_colocated_greedy_matches_transformers(prompts, reference_outputs):
    deployment = Deployment(DeploymentOptions(mode="colocated", dtype="float32", launcher="local"))
    try:
        addresses = deployment.start()
        with RouterThread(addresses) as router:
            chosen = range(1, len(prompts), 2)  # every other length, 2 to 1,500 tokens
            results = greedy_token_ids(router.url, [prompts[i] for i in chosen], MAX_TOKENS)
            for result, i in zip(results, chosen, strict=True):
                assert result == reference_outputs[i], f"prompt {i} ({len(prompts[i])} tokens)"
            (status,) = wait_all_free(addresses)
            assert status.num_free_blocks == status.num_blocks
            assert status.invariants_error == ""
    finally:
        deployment.stop()


def test_decode_worker_killed_mid_transfer(prompts):
    """The prefill side frees its blocks and the client gets a clear error (no other
    decode instance can take the request over). A worker that comes back on its address
    is tested in test_multinode, a lapsed reservation in test_recovery."""
    options = DeploymentOptions(
        dtype="float32",
        launcher="local",
        max_num_batched_tokens=128,  # a 1,500-token prompt goes out in 12 chunks
        deadlines={"transfer": 5.0, "commit": 5.0, "reserve": 5.0},
    )
    deployment = Deployment(options)
    try:
        deployment.start()
        prefill, decode = deployment.workers
        assert isinstance(deployment.launcher, LocalLauncher)
        with RouterThread(deployment.addresses) as router:
            result: dict[str, httpx.Response] = {}

            def long_request() -> None:
                body = {"prompt": prompts[-1], "max_tokens": 8, "temperature": 0.0}
                result["r"] = httpx.post(f"{router.url}/v1/completions", json=body, timeout=120)

            thread = threading.Thread(target=long_request)
            thread.start()
            deadline = time.monotonic() + 60
            while worker_status(prefill.address, False).kv_bytes_sent == 0:
                assert time.monotonic() < deadline, "no KV was ever sent"
                time.sleep(0.02)
            decode.kill()  # mid-transfer: the first chunks are out, the rest are not
            thread.join(60)
            response = result["r"]
            assert response.status_code >= 500, response.text
            message = response.json()["error"]["message"]
            assert "decode" in message.lower() or "handoff" in message.lower(), message

            (status,) = wait_all_free([prefill.address], timeout=30)
            assert status.num_free_blocks == status.num_blocks
            assert status.invariants_error == ""
    finally:
        deployment.stop()
