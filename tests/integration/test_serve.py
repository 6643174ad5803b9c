"""`tandem serve` as a user runs it: real Ray, one prefill and one decode worker, HTTP and gRPC.

Greedy float32 outputs must be token-identical to transformers (and so to tandem.LLM
and to colocated mode, tested in test_colocated.py); a hundred requests, many of
them abandoned at every stage, must leave every KV block free on both workers.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest

from benchmarks.serving.cli import tokenizer_for
from benchmarks.serving.workloads import build, point_seed
from proto.tandem.v1 import tandem_pb2, tandem_pb2_grpc
from tests.integration.serving import complete, greedy_token_ids, tandem_serve

MAX_TOKENS = 32


@pytest.fixture(scope="module")
def server():
    # The default deployment (Ray, disaggregated), stopped as Ctrl-C stops it.
    with tandem_serve("--dtype", "float32", stop_signal=signal.SIGINT) as s:
        yield s


def test_disaggregated_greedy_matches_transformers(server, prompts, reference_outputs):
    url, _ = server
    results = greedy_token_ids(url, prompts, MAX_TOKENS)
    for i, reference in enumerate(reference_outputs):
        assert results[i] == reference, f"prompt {i} ({len(prompts[i])} tokens)"


def test_handoffs_are_counted(server, prompts):
    url, _ = server
    complete(url, prompts[10], 4)
    status = httpx.get(f"{url}/status", timeout=30).json()
    text = str(status)
    assert "kv_bytes_sent" in text and "kv_bytes_received" in text
    prefill = [w for w in status["instances"] if w["role"] == "prefill"]
    decode = [w for w in status["instances"] if w["role"] == "decode"]
    assert prefill[0]["kv_bytes_sent"] > 0
    assert decode[0]["kv_bytes_received"] == prefill[0]["kv_bytes_sent"]
    assert prefill[0]["handoffs_completed"] >= 1


def test_chat_streams_over_http(server):
    url, _ = server
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert "Paris" in "".join(lines)


def test_grpc_generate(server, prompts, reference_outputs):
    _, grpc_port = server
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = tandem_pb2_grpc.TandemStub(channel)
        reply = stub.Generate(
            tandem_pb2.GenerateRequest(
                prompt_token_ids=prompts[3],
                params=tandem_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
            ),
            timeout=120,
        )
    assert list(reply.token_ids) == reference_outputs[3]


def test_no_block_leaks_when_requests_are_abandoned(server, prompts):
    """100 requests; a third are dropped by the client at a random point of their life.

    Dropped while queued (before any byte comes back), mid-prefill, right after the
    first token (while the KV handoff runs) or mid-decode. Afterwards every block on
    both workers is free and their invariants hold.
    """
    url, _ = server
    rng = random.Random(0)
    errors: list[str] = []

    def one(i: int) -> None:
        prompt = prompts[rng.randrange(len(prompts))]
        drop_after = rng.choice([None, None, 0, 1, 3])  # None: read to the end
        body = {"prompt": prompt, "max_tokens": 24, "temperature": 0.0, "stream": True}
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
                if r.status_code != 200:
                    errors.append(f"{i}: HTTP {r.status_code} {r.read()[:300]!r}")
                    return
                if drop_after == 0:
                    return
                for n, line in enumerate(r.iter_lines()):
                    if drop_after is not None and n >= drop_after:
                        return
                    if line == "data: [DONE]":
                        return
        except httpx.HTTPError as exc:
            errors.append(f"{i}: {exc}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for i, thread in enumerate(threads):
        thread.start()
        if i % 10 == 9:
            time.sleep(rng.random())
    for thread in threads:
        thread.join()
    assert not errors
    deadline = time.monotonic() + 120
    while True:
        instances = httpx.get(f"{url}/status?check_invariants=true", timeout=60).json()["instances"]
        idle = all(w["num_free_blocks"] == w["num_blocks"] for w in instances)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(1)
    for worker in instances:
        assert worker["num_free_blocks"] == worker["num_blocks"], worker
        assert worker.get("invariants_error", "") == "", worker
    # And the server still serves.
    assert complete(url, prompts[2], 4)["choices"][0]["finish_reason"] == "length"


def test_tandem_bench_run_measures_every_requested_token(server, tmp_path):
    """`tandem bench run` against the server: each request streams exactly the output
    length its workload asked for (EOS ignored), and the results carry vLLM's keys."""
    url, _ = server
    command = [sys.executable, "-m", "tandem.cli", "bench", "run", "--url", url]
    command += ["--workload", "sharegpt", "--num-prompts", "4", "--rates", "20"]
    command += ["--label", "it", "--out", str(tmp_path), "--seed", "5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "goodput (strict" in done.stdout
    point = json.loads((tmp_path / "it-sharegpt-20.json").read_text())
    asked = [r.output_len for r in build("sharegpt", tokenizer_for(), 4, point_seed(5, 20))]
    assert point["completed"] == 4 and point["failed"] == 0
    assert point["output_lens"] == asked
    assert point["total_output_tokens"] == sum(asked)
    assert all(text for text in point["generated_texts"])
    # Chunks after the first: one per token, none lost or merged.
    assert [len(itls) for itls in point["itls"]] == [n - 1 for n in asked]
    for key in ("median_ttft_ms", "p99_tpot_ms", "mean_itl_ms", "p90_e2el_ms", "request_goodput"):
        assert point[key] >= 0, key
    assert 0 <= point["slo_attainment"]["strict"]["both"] <= 1
    sweep = json.loads((tmp_path / "it-sharegpt-sweep.json").read_text())
    assert set(sweep["goodput"]) == {"strict", "relaxed"}
    assert (tmp_path / "it-sharegpt-strict.png").stat().st_size > 0
