"""Workers killed with SIGKILL under load: their requests resume on the survivors.

Two prefill and two decode workers (local processes, float32). A prefill worker dies
with prompts queued and half prefilled on it; then a decode worker dies while it is
being drained, mid-migration (the destination frozen after it reserved room, so the
copy cannot have finished). After each fault:
- every request ends with 200 and the same greedy tokens as a run without faults (a
  resumed request recomputes its prompt and the tokens it had streamed elsewhere, so
  the client's stream goes on without a token lost or repeated);
- the router counted exactly the requests that were on the dead worker as retried, and
  none as failed, aborted or rejected;
- the survivors hold no request and every block is free (the dead source's reservation
  on the destination too, long before its lease), invariants hold, and the router is
  still ready.
Last, a sender that reserves room on the surviving decode worker and goes silent: its
lease lapses and the blocks come back.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable

import grpc
import httpx
import pytest

from cluster.deployment import Deployment, DeploymentOptions
from cluster.worker_base import channel
from proto.tandem.internal.v1 import worker_pb2 as pb
from proto.tandem.internal.v1 import worker_pb2_grpc
from tests.integration.serving import RouterThread, metric_samples, wait_all_free, worker_status

LONG_OUTPUT = 16
# The short requests ignore EOS and run long enough that decode-0 still holds some of
# them when the last prompt has been handed off, however fast the machine decodes.
SHORT_OUTPUT = 192


REQUEST_COUNTERS = (
    "tandem:migrations_total",
    "tandem:requests_retried_total",
    "tandem:request_success_total",
    "tandem:requests_failed_total",
    "tandem:requests_rejected_total",
)


def counters(url: str) -> dict[str, float]:
    """The router's request counters, by series."""
    return metric_samples(url, REQUEST_COUNTERS)


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}


def run_concurrently(
    url: str,
    prompts: list[list[int]],
    max_tokens: int,
    while_running: Callable[[], None],
    ignore_eos: bool = False,
):
    """Greedy completions of the prompts, all at once; `while_running()` runs meanwhile.
    Returns each request's token ids (or its error response)."""
    results: dict[int, object] = {}

    def one(i: int) -> None:
        body = {
            "prompt": prompts[i],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "return_token_ids": True,
            "ignore_eos": ignore_eos,
        }
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        if response.status_code == 200:
            results[i] = response.json()["choices"][0]["token_ids"]
        else:
            results[i] = f"{response.status_code}: {response.text}"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    while_running()
    for thread in threads:
        thread.join(300)
    return [results.get(i) for i in range(len(prompts))]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def deployment():
    options = DeploymentOptions(
        prefill_instances=2,
        decode_instances=2,
        dtype="float32",
        launcher="local",
        max_num_batched_tokens=64,  # long prompts prefill in many chunks
        enable_prefix_caching=False,  # a prompt seen before takes as long the second time
    )
    deployment = Deployment(options)
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()


def test_workers_killed_under_load_lose_no_request(deployment, prompts, reference_outputs):
    prefill_0, prefill_1, decode_0, decode_1 = deployment.workers
    longest = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))[-4:]
    long_prompts = [prompts[i] for i in longest]  # 400 to 1,500 tokens
    short_prompts = [p for p in prompts if 20 <= len(p) <= 300][:6]
    with RouterThread(deployment.addresses) as router:
        url = router.url
        expected_long = [reference_outputs[i][:LONG_OUTPUT] for i in longest]  # transformers'
        expected_short = run_concurrently(
            url, short_prompts, SHORT_OUTPUT, lambda: None, ignore_eos=True
        )

        # 1. A prefill worker dies with prompts queued, half prefilled or handing off.
        on_prefill_0: list[int] = []

        def kill_prefill() -> None:
            def at_prefill(status) -> int:
                return status.num_waiting + status.num_running + status.num_held

            def all_prefilling() -> bool:
                statuses = [worker_status(p.address, False) for p in (prefill_0, prefill_1)]
                return sum(map(at_prefill, statuses)) == len(long_prompts)

            wait_for(all_prefilling, "every prompt at a prefill worker")
            on_prefill_0.append(at_prefill(worker_status(prefill_0.address, False)))
            prefill_0.kill()

        before = counters(url)
        results = run_concurrently(url, long_prompts, LONG_OUTPUT, kill_prefill)
        assert results == expected_long
        assert on_prefill_0[0] >= 1
        assert moved(before, counters(url)) == {
            'tandem:requests_retried_total{reason="prefill_lost"}': on_prefill_0[0],
            'tandem:request_success_total{finished_reason="length"}': len(long_prompts),
        }

        # 2. A decode worker dies under load, in the middle of migrating its requests
        # away: decode-0 is drained to decode-1, which is frozen (SIGSTOP) as soon as it
        # has reserved room for one, so that the source dies mid-copy.
        on_decode_0: list[int] = []
        drained: list[httpx.Response] = []

        handed_off_before = worker_status(prefill_1.address, False).handoffs_completed

        def kill_decode_mid_migration() -> None:
            def all_handed_off() -> bool:
                handed_off = worker_status(prefill_1.address, False).handoffs_completed
                return handed_off - handed_off_before == len(short_prompts)

            wait_for(all_handed_off, "every prompt handed off to a decode worker")
            assert worker_status(decode_0.address, False).num_running >= 1
            drain = threading.Thread(
                target=lambda: drained.append(
                    httpx.post(f"{url}/admin/instances/decode-0/drain", timeout=120)
                )
            )
            drain.start()
            wait_for(
                lambda: worker_status(decode_1.address, False).num_reserved >= 1,
                "a migration's reservation on decode-1",
            )
            decode_1.process.send_signal(signal.SIGSTOP)
            try:
                instances = httpx.get(f"{url}/admin/instances", timeout=10).json()["instances"]
                (source,) = [i for i in instances if i["instance_id"] == "decode-0"]
                on_decode_0.append(source["num_requests"])
                decode_0.kill()
            finally:
                decode_1.process.send_signal(signal.SIGCONT)
            drain.join(120)

        before = counters(url)
        results = run_concurrently(
            url, short_prompts, SHORT_OUTPUT, kill_decode_mid_migration, ignore_eos=True
        )
        assert results == expected_short
        assert on_decode_0[0] >= 1 and drained[0].status_code == 200
        changes = moved(before, counters(url))
        assert changes.pop('tandem:migrations_total{outcome="source_failed"}') >= 1
        changes.pop('tandem:migrations_total{outcome="committed"}', None)
        assert changes == {
            'tandem:requests_retried_total{reason="decode_lost"}': on_decode_0[0],
            'tandem:request_success_total{finished_reason="length"}': len(short_prompts),
        }

        # The reservation the dead source made on decode-1 is gone long before its lease
        # (60 s) would have freed it: the router undid it when the migration failed.
        survivors = [prefill_1.address, decode_1.address]
        for status in wait_all_free(survivors, timeout=20):
            assert status.num_free_blocks == status.num_blocks
            assert status.invariants_error == ""
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 200

    _a_lapsed_reservation_ends_with_an_error_that_says_why(decode_1.address)


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
