"""Cancelling a gRPC GenerateStream call aborts its request on the real worker that holds
it, in every phase of the request's life, and every KV block comes back.

`tandem serve` (local launcher, one prefill and one decode worker, the real model) gets
one cancelled call per phase:

    queued        waiting on the prefill worker behind a 2,500-token prompt
    mid-prefill   a 1,500-token prompt, after its first chunk, before its first token
    first token   cancelled on the first piece, while its KV goes to the decode worker
    mid-decode    after several pieces, on the decode worker

Last, SIGTERM under load drains the server: it stops taking requests and reports not
ready, lets the requests in flight finish, then exits cleanly.

Each request asks for thousands of tokens with ignore_eos, so one the cancel did not
reach would hold its blocks for minutes; the router's /status must instead show every
block free, nothing in flight and the invariants holding within FREED_WITHIN_S.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest

from proto.tandem.v1 import tandem_pb2, tandem_pb2_grpc
from tests.integration.serving import tandem_serve

# Far longer than FREED_WITHIN_S at any decode speed: a request the cancel did not
# reach cannot finish (and free its blocks) in time.
MAX_TOKENS = 4000
FREED_WITHIN_S = 25.0
LONG_PROMPT_TOKENS = 1500
BLOCKER_PROMPT_TOKENS = 2500  # five prefill steps of 512 tokens
NUM_DECODE_PIECES = 8

Status = dict[str, Any]
Call = Any  # a started unary-stream call: an iterator of pieces with cancel()


PROCESSES: list[subprocess.Popen[str]] = []  # the tandem serve of this module


@pytest.fixture(scope="module")
def server():
    with tandem_serve("--launcher", "local", "--dtype", "float32", processes=PROCESSES) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    _, grpc_port = server
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        yield tandem_pb2_grpc.TandemStub(channel)


def status(url: str, check_invariants: bool = False) -> Status:
    query = "?check_invariants=true" if check_invariants else ""
    response = httpx.get(f"{url}/status{query}", timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def instance(snapshot: Status, role: str) -> Status:
    (found,) = [w for w in snapshot["instances"] if w["role"] == role]
    return dict(found)


def prefill_queue(snapshot: Status) -> tuple[int, int]:
    """(running, waiting) on the prefill worker."""
    prefill = instance(snapshot, "prefill")
    return prefill["num_running"], prefill["num_waiting"]


def is_idle(snapshot: Status) -> bool:
    return snapshot["num_in_flight"] == 0 and all(
        w["num_free_blocks"] == w["num_blocks"]
        and w["num_waiting"] + w["num_running"] + w["num_reserved"] + w["num_held"] == 0
        for w in snapshot["instances"]
    )


def wait_until(url: str, condition: Callable[[Status], bool], timeout: float) -> Status:
    """Polls /status (invariants checked) until `condition` holds; the last snapshot."""
    deadline = time.monotonic() + timeout
    while True:
        snapshot = status(url, check_invariants=True)
        if condition(snapshot) or time.monotonic() > deadline:
            return snapshot
        time.sleep(0.05)


def assert_all_freed(url: str) -> None:
    snapshot = wait_until(url, is_idle, FREED_WITHIN_S)
    assert snapshot["num_in_flight"] == 0, snapshot
    for worker in snapshot["instances"]:
        assert worker["num_free_blocks"] == worker["num_blocks"], worker
        assert worker["num_waiting"] + worker["num_running"] == 0, worker
        assert worker["num_reserved"] + worker["num_held"] == 0, worker
        assert worker["invariants_error"] == "", worker


def start(stub: tandem_pb2_grpc.TandemStub, prompt: list[int], max_tokens: int) -> Call:
    params = tandem_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    request = tandem_pb2.GenerateRequest(prompt_token_ids=prompt, params=params)
    return stub.GenerateStream(request, timeout=300)


def cancel_and_drain(call: Call, pieces: list[tandem_pb2.GenerateStreamResponse]) -> None:
    """Cancels the call; appends the pieces that had arrived before, and checks it ends
    as CANCELLED (not finished: it asked for far more tokens than it got)."""
    call.cancel()
    with pytest.raises(grpc.RpcError) as raised:
        pieces.extend(call)
    assert raised.value.code() == grpc.StatusCode.CANCELLED


def random_prompt(seed: int, num_tokens: int) -> list[int]:
    """Distinct per seed, so that no request finds another's blocks in the prefix cache."""
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(num_tokens)]


@pytest.fixture(autouse=True)
def idle_before(server):
    url, _ = server
    assert is_idle(wait_until(url, is_idle, FREED_WITHIN_S)), "a previous test left work"


def test_cancel_while_queued(server, stub):
    url, _ = server
    blocker = start(stub, random_prompt(10, BLOCKER_PROMPT_TOKENS), 2)
    # While the blocker is mid-prefill, its chunks take each step's whole token budget:
    # a prompt arriving then waits, and is the only one waiting.
    alone = wait_until(url, lambda s: prefill_queue(s) == (1, 0), 30)
    assert prefill_queue(alone) == (1, 0), "the blocker was never seen mid-prefill"
    call = start(stub, random_prompt(11, LONG_PROMPT_TOKENS), MAX_TOKENS)
    snapshot = wait_until(url, lambda s: prefill_queue(s) == (1, 1), 30)
    pieces: list[tandem_pb2.GenerateStreamResponse] = []
    cancel_and_drain(call, pieces)
    assert prefill_queue(snapshot) == (1, 1), instance(snapshot, "prefill")
    assert snapshot["num_in_flight"] == 2, snapshot
    assert pieces == []
    # The request it waited behind is untouched by its cancel.
    finished = list(blocker)
    assert finished[-1].finish_reason == "length"
    assert sum(len(p.token_ids) for p in finished) == 2
    assert_all_freed(url)


def test_cancel_mid_prefill(server, stub):
    url, _ = server
    steps_before = instance(status(url), "prefill")["steps"]
    call = start(stub, random_prompt(20, LONG_PROMPT_TOKENS), MAX_TOKENS)

    def prefilling(snapshot: Status) -> bool:
        prefill = instance(snapshot, "prefill")
        return prefill["num_running"] == 1 and prefill["steps"] > steps_before

    # At least one chunk computed; the 1,500-token prompt needs three of 512.
    snapshot = wait_until(url, prefilling, 30)
    prefill = instance(snapshot, "prefill")
    pieces: list[tandem_pb2.GenerateStreamResponse] = []
    cancel_and_drain(call, pieces)
    assert prefilling(snapshot), prefill
    assert prefill["num_free_blocks"] < prefill["num_blocks"], prefill
    assert pieces == [], "the first token came before the cancel: not mid-prefill"
    assert_all_freed(url)


def test_cancel_on_first_token(server, stub):
    url, _ = server
    call = start(stub, random_prompt(30, 500), MAX_TOKENS)
    pieces = [next(call)]
    cancel_and_drain(call, pieces)
    assert pieces[0].index == 0 and len(pieces[0].token_ids) >= 1
    assert len(pieces) == 1, "more than the first piece came before the cancel"
    assert_all_freed(url)


def test_cancel_mid_decode(server, stub):
    url, _ = server
    call = start(stub, random_prompt(40, 64), MAX_TOKENS)
    pieces = [next(call) for _ in range(NUM_DECODE_PIECES)]
    decode = instance(status(url), "decode")
    cancel_and_drain(call, pieces)
    assert decode["num_running"] == 1, decode
    num_tokens = sum(len(p.token_ids) for p in pieces)
    assert NUM_DECODE_PIECES <= num_tokens < MAX_TOKENS
    assert all(p.finish_reason == "" for p in pieces)
    assert_all_freed(url)


def test_serves_after_cancellations(server, stub):
    url, _ = server
    params = tandem_pb2.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    request = tandem_pb2.GenerateRequest(prompt_token_ids=random_prompt(50, 100), params=params)
    reply = stub.Generate(request, timeout=120)
    assert reply.finish_reason == "length"
    assert len(reply.token_ids) == 8
    assert_all_freed(url)


def test_sigterm_drains_the_requests_in_flight_then_exits(server, stub):
    """Runs last: it stops the module's server."""
    url, _ = server
    (process,) = PROCESSES
    calls = [start(stub, random_prompt(60 + i, 200), 48) for i in range(3)]
    pieces: list[list[tandem_pb2.GenerateStreamResponse]] = [[next(c)] for c in calls]
    readers = [threading.Thread(target=lambda c=c, p=p: p.extend(c)) for c, p in zip(calls, pieces)]
    for reader in readers:
        reader.start()
    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/ready", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "/ready still 200 after SIGTERM"
        time.sleep(0.05)
    refused = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert refused.status_code == 503 and "draining" in refused.text, refused.text
    assert any(reader.is_alive() for reader in readers), "nothing was in flight to drain"
    for reader in readers:
        reader.join(120)
    for got in pieces:  # each ran to its end: none was cut short by the shutdown
        assert sum(len(p.token_ids) for p in got) == 48
        assert got[-1].finish_reason == "length"
    assert process.wait(60) == 0
