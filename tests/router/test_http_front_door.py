"""The HTTP front door beyond one completion: several choices, tokenizing, probes,
API keys, body limits, admission (429 / 503) and request ids; on fake workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proto.tandem.internal.v1 import worker_pb2
from router import __version__
from router.config import RouterConfig
from router.core import Router
from router.frontend import collect
from router.http import create_app
from router.policy import POLICIES, make_policy
from tests.router.fakes import (
    VOCAB,
    FakeWorker,
    fake_workers,
    http_server,
    started_router,
    wait_until,
)

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def serving(
    *roles: str, app_options: dict | None = None, **router_config
) -> AsyncIterator[tuple[httpx.AsyncClient, Router, list[FakeWorker]]]:
    async with contextlib.AsyncExitStack() as stack:
        workers = await stack.enter_async_context(fake_workers(*roles))
        router = await stack.enter_async_context(started_router(workers, **router_config))
        app = create_app(router, **(app_options or {}))
        url = await stack.enter_async_context(http_server(app))
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=5))
        yield client, router, workers


async def sse(response: httpx.Response) -> list:
    out = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_a_list_of_prompts_times_n_gives_one_choice_each_in_order() -> None:
    async with serving("prefill", "decode") as (client, router, workers):
        body = {"prompt": ["the cat", [VOCAB["hello"], VOCAB["world"]]], "n": 2, "seed": 7}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        texts = [(c["index"], c["text"]) for c in out["choices"]]
        assert texts == [(0, " the cat"), (1, " the cat"), (2, " hello world"), (3, " hello world")]
        assert out["usage"]["completion_tokens"] == 8
        assert out["usage"]["prompt_tokens"] == sum(len(p) for p in workers[0].prompts)
        assert len(workers[0].prompts) == 4 and router.num_in_flight == 0


async def test_streamed_choices_each_end_once_and_usage_comes_last() -> None:
    async with serving("colocated") as (client, _, workers):
        workers[0].knobs.step_s = 0.01
        body = {
            "messages": [{"role": "user", "content": "the cat sat"}],
            "n": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            chunks = await sse(r)
        assert chunks[-1] == "[DONE]"
        usage = chunks[-2]
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 9
        for index in range(3):
            mine = [c["choices"][0] for c in chunks[:-2] if c["choices"][0]["index"] == index]
            assert mine[0]["delta"]["role"] == "assistant"
            assert "".join(c["delta"].get("content", "") for c in mine) == " the cat sat"
            assert [c["finish_reason"] for c in mine].count("stop") == 1
            assert mine[-1]["finish_reason"] == "stop"
        assert len({c["id"] for c in chunks[:-1]}) == 1


async def test_a_client_that_leaves_a_stream_of_several_choices_aborts_them_all() -> None:
    async with serving("colocated") as (client, router, workers):
        workers[0].knobs.step_s = 0.2
        body = {"prompt": "the cat sat on a mat", "n": 2, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break
        await wait_until(lambda: len(workers[0].aborted) == 2)
        await wait_until(lambda: router.num_in_flight == 0)


async def test_tokenize_detokenize_version_and_models() -> None:
    async with serving("colocated") as (client, _, _workers):
        r = await client.post("/tokenize", json={"prompt": "hello world"})
        assert r.status_code == 200
        tokens = r.json()["tokens"]
        assert tokens[-2:] == [VOCAB["hello"], VOCAB["world"]] and r.json()["count"] == len(tokens)
        plain = await client.post(
            "/tokenize", json={"prompt": "hello world", "add_special_tokens": False}
        )
        assert plain.json()["tokens"] == [VOCAB["hello"], VOCAB["world"]]
        messages = [{"role": "user", "content": "hi"}]
        chat = await client.post("/tokenize", json={"messages": messages})
        assert chat.json()["tokens"][-1] == VOCAB["<|assistant|>"]
        back = await client.post("/detokenize", json={"tokens": [VOCAB["hello"], VOCAB["world"]]})
        assert back.json() == {"prompt": "hello world"}
        bad = await client.post("/detokenize", json={"tokens": [10**6]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
        assert (await client.get("/version")).json() == {"version": __version__}


async def test_api_keys_guard_every_route_but_the_probes() -> None:
    options = {"api_keys": ["k1", "k2"]}
    async with serving("colocated", app_options=options) as (client, _, _workers):
        for path in ("/health", "/ready"):
            assert (await client.get(path)).status_code == 200
        body = {"prompt": "hello", "max_tokens": 1}
        missing = await client.post("/v1/completions", json=body)
        assert missing.status_code == 401
        assert "Authorization: Bearer" in missing.json()["error"]["message"]
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "not valid" in wrong.json()["error"]["message"]
        assert (await client.get("/status")).status_code == 401
        good = await client.post(
            "/v1/completions", json=body, headers={"Authorization": "Bearer k2"}
        )
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == " hello"


async def test_an_oversized_body_is_413_whether_or_not_its_length_is_declared() -> None:
    options = {"max_body_bytes": 1000}
    async with serving("colocated", app_options=options) as (client, router, _workers):
        big = json.dumps({"prompt": "hello " * 500}).encode()
        r = await client.post("/v1/completions", content=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
            for i in range(0, len(big), 100):
                yield big[i : i + 100]

        r = await client.post("/v1/completions", content=chunks())
        assert r.status_code == 413
        r = await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 1})
        assert r.status_code == 200 and router.num_in_flight == 0


async def test_a_body_that_is_not_json_is_400() -> None:
    async with serving("colocated") as (client, _, _workers):
        r = await client.post(
            "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


async def test_over_the_in_flight_bound_is_429_with_retry_after_then_recovers() -> None:
    async with serving("colocated", max_in_flight=2) as (client, router, workers):
        workers[0].knobs.step_s = 0.3
        body = {"prompt": "the cat sat", "max_tokens": 3}
        slow = [asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in range(2)]
        await wait_until(lambda: router.num_in_flight == 2)
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert all(s.status_code == 200 for s in await asyncio.gather(*slow))
        workers[0].knobs.step_s = 0.0
        assert (await client.post("/v1/completions", json=body)).status_code == 200


async def test_over_the_waiting_prompt_tokens_bound_is_429() -> None:
    async with serving("prefill", "decode", max_waiting_prompt_tokens=6) as (client, router, w):
        w[0].knobs.first_token_s = 0.5  # the prefill worker holds the first token back
        first = asyncio.ensure_future(
            client.post("/v1/completions", json={"prompt": "a b c d", "max_tokens": 1})
        )
        await wait_until(lambda: router.waiting_prompt_tokens > 0)
        r = await client.post("/v1/completions", json={"prompt": "the cat sat", "max_tokens": 1})
        assert r.status_code == 429 and "max_waiting_prompt_tokens" in r.json()["error"]["message"]
        assert (await first).status_code == 200
        assert router.waiting_prompt_tokens == 0


async def test_draining_is_503_and_not_ready() -> None:
    async with serving("colocated") as (client, router, _workers):
        assert (await client.get("/ready")).status_code == 200
        router.drain()
        ready = await client.get("/ready")
        assert ready.status_code == 503 and "draining" in ready.json()["error"]["message"]
        r = await client.post("/v1/completions", json={"prompt": "hello"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert (await client.get("/health")).status_code == 200


async def test_the_clients_request_id_is_echoed_but_not_used_inside() -> None:
    async with serving("colocated") as (client, _, _workers):
        headers = {"X-Request-Id": "mine-1"}
        body = {"prompt": "hello", "max_tokens": 1}
        r = await client.post("/v1/completions", json=body, headers=headers)
        assert r.headers["x-request-id"] == "mine-1"
        assert r.json()["id"].startswith("cmpl-") and r.json()["id"] != "mine-1"
        again = await client.post("/v1/completions", json=body, headers=headers)
        assert again.status_code == 200 and again.json()["id"] != r.json()["id"]
        assert (await client.get("/health", headers=headers)).headers["x-request-id"] == "mine-1"


async def test_metrics_count_requests_rejections_and_worker_load() -> None:
    async with serving("prefill", "decode", load_poll_interval_s=0.05) as (client, router, _):
        ok = await client.post("/v1/completions", json={"prompt": "the cat sat"})
        assert ok.status_code == 200
        assert (await client.post("/v1/completions", json={"prompt": ""})).status_code == 400
        await asyncio.sleep(0.2)  # a Status poll
        text = (await client.get("/metrics")).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        ttft = families["tandem:time_to_first_token_seconds"]
        count = next(s.value for s in ttft.samples if s.name.endswith("_count"))
        assert count == 1
        rejected = families["tandem:requests_rejected"]
        by_reason = {s.labels["reason"]: s.value for s in rejected.samples}
        assert by_reason["invalid_request"] == 1
        usage = {
            s.labels["instance"]: s.value for s in families["tandem:kv_cache_usage_perc"].samples
        }
        assert usage == {"prefill-0": 4 / 64, "decode-1": 4 / 64}
        kv = families["tandem:kv_transfer_bytes"].samples[0].value
        assert kv == router.handoffs.summary()["kv_bytes_total"] > 0


@pytest.mark.parametrize("name", sorted(POLICIES))
async def test_every_routing_policy_serves_end_to_end(name: str) -> None:
    async with fake_workers("prefill", "prefill", "decode") as workers:
        config = RouterConfig(load_poll_interval_s=0.05, connect_timeout_s=5)
        async with Router([w.address for w in workers], make_policy(name), config) as router:
            await wait_until(lambda: router.loads.get("prefill-0") is not None)
            prompts = [[VOCAB["hello"], VOCAB["world"]], [VOCAB["the"], VOCAB["cat"]]] * 4
            params = worker_pb2.SamplingParams(max_tokens=4)
            done = await asyncio.gather(*(collect(router.generate(p, params)) for p in prompts))
            assert [c.text for c in done] == [" hello world", " the cat"] * 4
            served = [len(w.prompts) for w in workers[:2]]
            assert sum(served) == 8
            if name in ("round_robin", "least_loaded"):
                assert min(served) > 0  # the work is spread
            if name == "prefix_aware":  # equal prompts go where their prefix went
                owner = {tuple(p): w.instance_id for w in workers[:2] for p in w.prompts}
                assert len(owner) == 2
                assert all(
                    sum(p == list(q) for p in w.prompts) in (0, 4)
                    for w in workers[:2]
                    for q in owner
                )
            assert router.num_in_flight == 0
