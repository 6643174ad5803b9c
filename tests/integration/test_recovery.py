"""Workers killed with SIGKILL under load: their requests resume on the survivors.

Two prefill and two decode workers (local processes, float32). Each fault is injected
while every request is in flight, then:
- every request ends with 200 and the same greedy tokens as a run without faults (a
  resumed request recomputes its prompt and the tokens it had streamed elsewhere, so
  the client's stream goes on without a token lost or repeated);
- the router counted exactly the requests that were on the dead worker as retried, and
  none as failed, aborted or rejected;
- the survivors hold no request and every block is free, invariants hold, and the router
  is still ready.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import pytest

from cluster.deployment import Deployment, DeploymentOptions
from tests.integration.serving import RouterThread, wait_all_free, worker_status

LONG_OUTPUT, SHORT_OUTPUT = 16, 64


def counters(url: str) -> dict[str, float]:
    """The router's request counters, by series."""
    wanted = (
        "tandem:requests_retried_total",
        "tandem:request_success_total",
        "tandem:requests_failed_total",
        "tandem:requests_rejected_total",
    )
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(wanted):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            pairs = labels.rstrip("}").split(",") if labels else []
            label = ",".join(x for x in pairs if not x.startswith("model_name="))
            values[f"{name}{{{label}}}"] = float(value)
    return values


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}


def run_concurrently(
    url: str, prompts: list[list[int]], max_tokens: int, while_running: Callable[[], None]
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
        }
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        results[i] = (
            response.json()["choices"][0]["token_ids"] if response.status_code == 200 else response
        )

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


def test_workers_killed_under_load_lose_no_request(deployment, prompts):
    prefill_0, prefill_1, decode_0, decode_1 = deployment.workers
    long_prompts = sorted(prompts, key=len)[-4:]  # 400 to 1,500 tokens
    short_prompts = [p for p in prompts if 20 <= len(p) <= 300][:6]
    with RouterThread(deployment.addresses) as router:
        url = router.url
        expected_long = run_concurrently(url, long_prompts, LONG_OUTPUT, lambda: None)
        expected_short = run_concurrently(url, short_prompts, SHORT_OUTPUT, lambda: None)

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

        # 2. A decode worker dies with requests decoding on it.
        on_decode_0: list[int] = []

        def kill_decode() -> None:
            def all_decoding() -> bool:
                statuses = [worker_status(d.address, False) for d in (decode_0, decode_1)]
                return sum(s.num_running for s in statuses) == len(short_prompts)

            wait_for(all_decoding, "every request decoding")
            on_decode_0.append(worker_status(decode_0.address, False).num_running)
            decode_0.kill()

        before = counters(url)
        results = run_concurrently(url, short_prompts, SHORT_OUTPUT, kill_decode)
        assert results == expected_short
        assert on_decode_0[0] >= 1
        assert moved(before, counters(url)) == {
            'tandem:requests_retried_total{reason="decode_lost"}': on_decode_0[0],
            'tandem:request_success_total{finished_reason="length"}': len(short_prompts),
        }

        survivors = [prefill_1.address, decode_1.address]
        for status in wait_all_free(survivors):
            assert status.num_free_blocks == status.num_blocks
            assert status.invariants_error == ""
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 200
