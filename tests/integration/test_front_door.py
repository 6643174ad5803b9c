"""The front door as users meet it, on `tandem serve` with the real model: the official
`openai` client, API keys, logprobs, several choices, and bad input refused cleanly
over HTTP and gRPC with every KV block free afterwards."""

from __future__ import annotations

import math
import time

import grpc
import httpx
import openai
import pytest

from proto.tandem.v1 import tandem_pb2, tandem_pb2_grpc
from tests.integration.serving import tandem_serve

KEY = "test-key-1"


@pytest.fixture(scope="module")
def server():
    flags = ("--launcher", "local", "--dtype", "float32", "--policy", "least_loaded")
    with tandem_serve(
        *flags, env={"TANDEM_API_KEYS": f"{KEY},other-key"}, ready_path="/ready"
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def all_blocks_free(url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        status = httpx.get(
            f"{url}/status",
            params={"check_invariants": "true"},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        ).json()
        instances = status["instances"]
        if all(i["num_free_blocks"] == i["num_blocks"] for i in instances):
            assert all(not i.get("invariants_error") for i in instances), instances
            assert status["num_in_flight"] == 0
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks still in use: {instances}")
        time.sleep(0.2)


def test_the_official_client_completes_and_streams(client):
    completion = client.completions.create(
        model="default", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    text = completion.choices[0].text
    assert completion.choices[0].finish_reason in ("stop", "length") and text
    assert completion.usage.completion_tokens <= 8
    assert completion.usage.prompt_tokens_details.cached_tokens >= 0
    stream = client.completions.create(
        model="default",
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens


def test_the_official_client_chats_and_streams(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(
        model="default", messages=messages, max_tokens=12, temperature=0
    )
    text = reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant" and text
    stream = client.chat.completions.create(
        model="default", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == text


def test_logprobs_in_both_forms_agree_with_greedy_choice(client):
    completion = client.completions.create(
        model="default", prompt="One, two, three,", max_tokens=4, temperature=0, logprobs=3
    )
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert "".join(logprobs.tokens) == completion.choices[0].text
    for sampled, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and sampled <= 0
        assert math.isclose(sampled, max(top.values()), abs_tol=1e-4)  # greedy: the best
    messages = [{"role": "user", "content": "Say hello."}]
    reply = client.chat.completions.create(
        model="default",
        messages=messages,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-4)


def test_n_seeded_choices_are_reproducible(client):
    def sample():
        return client.completions.create(
            model="default", prompt="Once upon a time", max_tokens=6, n=3, seed=11, temperature=1
        )

    first, second = sample(), sample()
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in second.choices]
    assert len(set(texts)) > 1  # each choice has its own seed


def test_a_wrong_api_key_is_refused(server):
    url, _ = server
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(f"{url}/health").status_code == 200


BAD_HTTP = [
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "word " * 9000}, "prompt"),
    ({"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "hi", "temperature": 5}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "logprobs": 50}, "logprobs"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": [1, 10**7]}, "prompt"),
    ({"prompt": "hi", "n": 100000}, "n"),
]


@pytest.mark.parametrize(("body", "param"), BAD_HTTP)
def test_bad_http_input_is_a_clear_400_and_leaks_nothing(server, body, param):
    url, _ = server
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and param in (error["param"] or "")
    assert param in error["message"] or error["param"] == param


def test_other_bad_http_input(server):
    url, _ = server
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    not_json = httpx.post(f"{url}/v1/completions", content=b"{oops", headers=headers)
    assert not_json.status_code == 400
    chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": []}, headers=headers)
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    model = httpx.post(
        f"{url}/v1/completions", json={"prompt": "hi", "model": "gpt-9"}, headers=headers
    )
    assert model.status_code == 404 and model.json()["error"]["code"] == "model_not_found"
    ok = httpx.post(
        f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=headers, timeout=60
    )
    assert ok.status_code == 200
    all_blocks_free(url)


def test_bad_grpc_input_is_invalid_argument_and_leaks_nothing(server):
    url, grpc_port = server
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = tandem_pb2_grpc.TandemStub(channel)
    metadata = [("authorization", f"Bearer {KEY}")]
    P = tandem_pb2.SamplingParams
    cases = [
        (tandem_pb2.GenerateRequest(prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
        (tandem_pb2.GenerateRequest(prompt="word " * 9000), grpc.StatusCode.INVALID_ARGUMENT),
        (
            tandem_pb2.GenerateRequest(prompt="hi", params=P(max_tokens=100000)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            tandem_pb2.GenerateRequest(prompt="hi", params=P(temperature=9)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            tandem_pb2.GenerateRequest(prompt="hi", params=P(top_p=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            tandem_pb2.GenerateRequest(prompt="hi", params=P(stop=[""])),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            tandem_pb2.GenerateRequest(prompt_token_ids=[1, 10**7]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (tandem_pb2.GenerateRequest(prompt="hi", model="gpt-9"), grpc.StatusCode.NOT_FOUND),
    ]
    for request, code in cases:
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(request, metadata=metadata, timeout=30)
        assert error.value.code() == code, request
        assert error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(tandem_pb2.GenerateRequest(prompt="hi"), timeout=30)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = stub.Generate(
        tandem_pb2.GenerateRequest(prompt="hi", params=P(max_tokens=2)),
        metadata=metadata,
        timeout=60,
    )
    assert ok.usage.completion_tokens >= 1
    channel.close()
    all_blocks_free(url)


def test_metrics_report_the_requests(server):
    url, _ = server
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "tandem:time_to_first_token_seconds_count" in text
    assert "tandem:kv_cache_usage_perc" in text
    rejected = [
        line
        for line in text.splitlines()
        if line.startswith("tandem:requests_rejected_total") and 'reason="invalid_request"' in line
    ]
    assert rejected and float(rejected[0].split()[-1]) >= len(BAD_HTTP)
