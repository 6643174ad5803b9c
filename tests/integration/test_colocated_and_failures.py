"""Colocated mode gives the same tokens; a decode worker killed mid-transfer loses nothing.

Both use the local-process launcher (the path for machines without Ray).
"""

from __future__ import annotations

import contextlib
import threading
import time

import grpc
import httpx

from cluster.deployment import Deployment, DeploymentOptions
from cluster.launcher import LocalLauncher
from cluster.worker_base import channel
from proto.tandem.internal.v1 import worker_pb2 as pb
from proto.tandem.internal.v1 import worker_pb2_grpc
from tests.integration.serving import (
    RouterThread,
    complete,
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
            results = greedy_token_ids(router.url, prompts, MAX_TOKENS)
            for i, reference in enumerate(reference_outputs):
                assert results[i] == reference, f"prompt {i} ({len(prompts[i])} tokens)"
            (status,) = wait_all_free(addresses)
            assert status.num_free_blocks == status.num_blocks
            assert status.invariants_error == ""
    finally:
        deployment.stop()


def test_decode_worker_killed_mid_transfer(prompts):
    """The prefill side frees its blocks, the client gets a clear error, and once a
    decode worker is back on the same address the next request succeeds."""
    options = DeploymentOptions(
        dtype="float32",
        launcher="local",
        max_num_batched_tokens=128,  # a 1,500-token prompt goes out in 12 chunks
        deadlines={"transfer": 5.0, "commit": 5.0, "reserve": 5.0},
    )
    deployment = Deployment(options)
    try:
        specs = options.worker_specs("")
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

            # A decode worker comes back on the same address; the router reconnects.
            spec = specs[1]
            spec.store_address = deployment.store_address
            spec.port = int(decode.address.rsplit(":", 1)[1])
            deployment.launcher.start([spec])
            deadline = time.monotonic() + 60
            while True:
                try:
                    body = complete(router.url, prompts[4], 8)
                    break
                except AssertionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
            assert body["choices"][0]["finish_reason"] in ("length", "stop")

        _a_lapsed_reservation_ends_with_an_error_that_says_why(decode.address)  # restarted
    finally:
        deployment.stop()


def _a_lapsed_reservation_ends_with_an_error_that_says_why(decode_address: str) -> None:
    """A sender that reserves room and goes silent: D frees the blocks when the lease
    lapses, and the router's stream gets an error delta (never a bare "abort", which a
    router would pass on as a finished completion)."""
    stub = worker_pb2_grpc.WorkerStub(channel(decode_address))
    info = stub.Info(pb.InfoRequest(), timeout=30)
    deltas: list[pb.TokenDelta] = []

    def read() -> None:
        stream = stub.Subscribe(pb.SubscribeRequest(router_id="silent-sender"), timeout=30)
        with contextlib.suppress(grpc.RpcError):  # the timeout ends the stream
            for batch in stream:
                deltas.extend(batch.deltas)
                if any(d.finished for d in deltas):
                    stream.cancel()

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.5)  # the subscription is registered before the reservation
    stub.Reserve(
        pb.ReserveRequest(
            request_id="lapses",
            prompt_token_ids=list(range(40)),
            params=pb.SamplingParams(max_tokens=4, top_p=1.0),
            num_kv_tokens=40,
            layout=info.layout,
            router_id="silent-sender",
            deadline_seconds=1.0,
        ),
        timeout=30,
    )
    reader.join(40)
    (last,) = [d for d in deltas if d.request_id == "lapses"]
    assert last.finished and last.finish_reason == "error", last
    assert "lease lapsed" in last.error and "retry" in last.error, last.error
    (status,) = wait_all_free([decode_address], timeout=30)
    assert status.num_free_blocks == status.num_blocks
    assert status.num_reserved == 0 and status.invariants_error == ""
