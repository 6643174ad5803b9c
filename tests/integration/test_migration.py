"""Live migration between two real decode workers, driven through the router's admin
API while clients stream: no token lost or repeated, greedy and seeded output the
same as without migration, every block back afterwards, and a drain that loses
nothing."""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

import httpx
import pytest

from cluster.deployment import Deployment, DeploymentOptions
from router.config import RouterConfig
from router.policy import RoundRobinPolicy
from tests.integration.serving import RouterThread, complete, wait_all_free

GREEDY: dict[str, Any] = {"temperature": 0.0}
SEEDED: dict[str, Any] = {"temperature": 0.8, "top_p": 0.95, "seed": 7}


@pytest.fixture(scope="module")
def cluster():
    options = DeploymentOptions(
        decode_instances=2, dtype="float32", launcher="local", max_num_batched_tokens=256
    )
    deployment = Deployment(options)
    try:
        addresses = deployment.start()
        with RouterThread(addresses) as router:
            yield router, addresses
    finally:
        deployment.stop()


class Stream:
    """One streamed completion read on its own thread: its id, token ids and text."""

    def __init__(self, url: str, prompt: list[int], max_tokens: int, sampling: dict[str, Any]):
        self.body = {
            "model": "default",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "stream": True,
            "return_token_ids": True,
            "ignore_eos": True,
            **sampling,
        }
        self.url = url
        self.id = ""
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body, timeout=300) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                choice = chunk["choices"][0]
                self.id = chunk["id"]
                self.token_ids += choice.get("token_ids") or []
                self.text += choice["text"]
                self.finish_reason = choice["finish_reason"] or self.finish_reason
                self.started.set()
        self.started.set()

    def wait_tokens(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.token_ids) < count and self._thread.is_alive():
            assert time.monotonic() < deadline, f"{len(self.token_ids)} tokens, not {count}"
            time.sleep(0.01)

    def join(self) -> None:
        self._thread.join(300)
        assert not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def migrate(url: str, request_id: str, destination: str | None = None) -> dict[str, Any]:
    body = {} if destination is None else {"destination": destination}
    response = httpx.post(f"{url}/admin/requests/{request_id}/migrate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    (outcome,) = response.json()["migrations"]
    return dict(outcome)


def decode_ids(url: str) -> list[str]:
    instances = httpx.get(f"{url}/admin/instances", timeout=30).json()["instances"]
    return sorted(i["instance_id"] for i in instances if i["role"] == "decode")


def expected_tokens(url: str, prompt: list[int], max_tokens: int, sampling: dict[str, Any]):
    body = complete(url, prompt, max_tokens, return_token_ids=True, ignore_eos=True, **sampling)
    choice = body["choices"][0]
    return choice["token_ids"], choice["text"]


def expected_all(url: str, cases: list[tuple[list[int], dict[str, Any]]], max_tokens: int):
    """expected_tokens of every case, sent together (they share batches, as later)."""
    results: list[Any] = [None] * len(cases)

    def run(i: int) -> None:
        results[i] = expected_tokens(url, cases[i][0], max_tokens, cases[i][1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def assert_all_free(addresses: list[str]) -> None:
    for status in wait_all_free(addresses):
        assert status.num_free_blocks == status.num_blocks, status.instance_id
        assert status.invariants_error == "", status.invariants_error


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_one_request_migrated_four_times_mid_decode_streams_the_same_tokens(
    cluster, prompts, sampling
):
    router, addresses = cluster
    prompt, max_tokens = prompts[9], 160
    tokens, text = expected_tokens(router.url, prompt, max_tokens, sampling)
    stream = Stream(router.url, prompt, max_tokens, sampling)
    outcomes = []
    for i in range(4):
        stream.wait_tokens(10 + 25 * i)
        outcomes.append(migrate(router.url, stream.id))
    stream.join()
    assert [o["committed"] for o in outcomes] == [True] * 4, outcomes
    assert outcomes[0]["destination_id"] == outcomes[1]["source_id"]  # back and forth
    assert outcomes[1]["destination_id"] == outcomes[0]["source_id"]
    assert all(o["num_kv_tokens"] >= len(prompt) + 10 for o in outcomes)
    assert stream.finish_reason == "length"
    assert stream.token_ids == tokens
    assert stream.text == text
    assert_all_free(addresses)


def test_many_requests_migrating_back_and_forth_under_load_lose_and_repeat_nothing(
    cluster, prompts
):
    router, addresses = cluster
    cases = [(prompts[i], GREEDY if i % 2 else {**SEEDED, "seed": i}) for i in range(3, 11)]
    max_tokens = 80
    expected = expected_all(router.url, cases, max_tokens)
    streams = [Stream(router.url, p, max_tokens, s) for p, s in cases]
    rng = random.Random(0)
    committed = 0
    while any(s.running for s in streams):
        live = [s for s in streams if s.running and len(s.token_ids) > 1]
        if not live:
            time.sleep(0.02)
            continue
        response = httpx.post(
            f"{router.url}/admin/requests/{rng.choice(live).id}/migrate", json={}, timeout=300
        )
        if response.status_code == 404:
            continue  # it finished meanwhile
        assert response.status_code == 200, response.text
        committed += sum(o["committed"] for o in response.json()["migrations"])
    assert committed >= 8
    for stream, (tokens, text) in zip(streams, expected, strict=True):
        stream.join()
        assert stream.finish_reason == "length"
        assert (stream.token_ids, stream.text) == (tokens, text)
    assert_all_free(addresses)


def test_bad_migrations_are_refused_with_reasons(cluster, prompts):
    router, addresses = cluster
    url = router.url
    response = httpx.post(f"{url}/admin/requests/cmpl-nobody/migrate", json={}, timeout=30)
    assert response.status_code == 404
    assert "cmpl-nobody" in response.json()["error"]["message"]
    stream = Stream(url, prompts[8], 120, GREEDY)
    stream.wait_tokens(3)
    for body, says in [
        ({"destination": "nowhere"}, "not a decode instance"),
        ({"desination": decode_ids(url)[0]}, "desination"),
    ]:
        response = httpx.post(f"{url}/admin/requests/{stream.id}/migrate", json=body, timeout=30)
        assert response.status_code == 400, response.text
        assert says in response.json()["error"]["message"]
    stream.join()
    assert stream.finish_reason == "length" and len(stream.token_ids) == 120
    assert_all_free(addresses)


def test_the_balancing_scheduler_moves_requests_off_the_busier_instance(cluster, prompts):
    """Round-robin puts both long contexts on one decode instance and both short ones on
    the other; the router's scheduler moves one long context over, and every stream
    still matches its reference."""
    reference, addresses = cluster
    cases = [
        (prompts[-1], GREEDY),
        (prompts[0], GREEDY),
        (prompts[9], GREEDY),
        (prompts[1], GREEDY),
    ]
    max_tokens = 120
    expected = expected_all(reference.url, cases, max_tokens)
    config = RouterConfig(
        migration_policy="balance", migration_interval_s=0.3, migration_threshold=0.02
    )
    with RouterThread(addresses, policy=RoundRobinPolicy(), config=config) as router:
        streams = []
        for prompt, sampling in cases:  # one at a time: round-robin's order is fixed
            streams.append(Stream(router.url, prompt, max_tokens, sampling))
            streams[-1].wait_tokens(1)
        for stream in streams:
            stream.join()
        metrics = httpx.get(f"{router.url}/metrics", timeout=30).text
    committed = [
        line for line in metrics.splitlines()
        if line.startswith("tandem:migrations_total{") and 'outcome="committed"' in line
    ]  # fmt: skip
    assert committed and float(committed[0].rsplit(" ", 1)[1]) >= 1, committed
    for stream, (tokens, text) in zip(streams, expected, strict=True):
        assert (stream.token_ids, stream.text) == (tokens, text)
    assert_all_free(addresses)


def test_draining_a_decode_instance_under_load_completes_every_request(cluster, prompts):
    """Last in this module: the drained instance stays out of routing."""
    router, addresses = cluster
    url = router.url
    cases = [(prompts[i], GREEDY if i % 2 else {**SEEDED, "seed": i}) for i in range(4, 10)]
    max_tokens = 60
    expected = expected_all(url, cases, max_tokens)
    streams = [Stream(url, p, max_tokens, s) for p, s in cases]
    for stream in streams:
        stream.wait_tokens(2)
    drained = decode_ids(url)[0]
    response = httpx.post(f"{url}/admin/instances/{drained}/drain", json={}, timeout=300)
    assert response.status_code == 200, response.text
    summary = response.json()
    assert summary["left"] == [] and summary["migrated"] >= 1, summary
    instances = {
        i["instance_id"]: i for i in httpx.get(f"{url}/admin/instances").json()["instances"]
    }
    assert instances[drained]["draining"] and instances[drained]["num_requests"] == 0
    for stream, (tokens, text) in zip(streams, expected, strict=True):
        stream.join()
        assert (stream.token_ids, stream.text) == (tokens, text)
    after = Stream(url, prompts[5], 8, GREEDY)  # new requests avoid the drained instance
    after.wait_tokens(1)
    instances = {
        i["instance_id"]: i for i in httpx.get(f"{url}/admin/instances").json()["instances"]
    }
    assert instances[drained]["num_requests"] == 0
    after.join()
    assert_all_free(addresses)
