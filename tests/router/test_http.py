"""The OpenAI HTTP API over a real loopback port (uvicorn), on fake workers."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from router.http import create_app
from tests.router.fakes import (
    MAX_MODEL_LEN,
    MODEL_ID,
    VOCAB,
    FakeWorker,
    fake_workers,
    http_server,
    started_router,
    wait_until,
)

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def serving(*roles: str) -> AsyncIterator[tuple[httpx.AsyncClient, list[FakeWorker]]]:
    async with contextlib.AsyncExitStack() as stack:
        workers = await stack.enter_async_context(fake_workers(*roles))
        router = await stack.enter_async_context(started_router(workers))
        url = await stack.enter_async_context(http_server(create_app(router)))
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=5))
        yield client, workers


async def events(response: httpx.Response) -> list:
    """The SSE data of a streamed response, [DONE] included."""
    assert response.headers["content-type"].startswith("text/event-stream")
    out = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.mark.parametrize("model", [MODEL_ID, "tiny-echo", "default", None])
async def test_completion(model: str | None) -> None:
    async with serving("prefill", "decode") as (client, _):
        r = await client.post("/v1/completions", json={"prompt": "the cat sat", "model": model})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
        assert body["model"] == MODEL_ID
        assert body["choices"] == [
            {"index": 0, "text": " the cat sat", "finish_reason": "stop", "logprobs": None}
        ]
        assert body["usage"] == {
            "prompt_tokens": 4,
            "completion_tokens": 3,
            "total_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 0},
        }


async def test_completion_of_token_ids_stops_at_max_tokens() -> None:
    async with serving("colocated") as (client, _):
        prompt = [VOCAB["hello"], VOCAB["world"], VOCAB["the"]]
        body = {"prompt": prompt, "max_tokens": 2, "return_token_ids": True}
        choice = (await client.post("/v1/completions", json=body)).json()["choices"][0]
        assert choice["text"] == " hello world" and choice["finish_reason"] == "length"
        assert choice["prompt_token_ids"] == prompt and choice["token_ids"] == prompt[:2]


async def test_streamed_completion_with_usage() -> None:
    async with serving("prefill", "decode") as (client, _):
        body = {
            "prompt": "the cat sat",
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        async with client.stream("POST", "/v1/completions", json=body) as r:
            chunks = await events(r)
        assert chunks[-1] == "[DONE]"
        usage, text_chunks = chunks[-2], chunks[:-2]
        choices = [c["choices"][0] for c in text_chunks]
        assert "".join(c["text"] for c in choices) == " the cat sat"
        assert [c["finish_reason"] for c in choices] == [None, None, "stop"]
        token_ids = [t for c in choices for t in c["token_ids"]]
        assert token_ids == [VOCAB[w] for w in ("the", "cat", "sat")]
        assert choices[0]["prompt_token_ids"][0] == VOCAB["<s>"]
        assert {c["id"] for c in chunks[:-1]} == {usage["id"]}
        assert usage["usage"]["completion_tokens"] == 3 and usage["choices"] == []


async def test_chat_completion_fills_the_context_by_default() -> None:
    async with serving("prefill", "decode") as (client, workers):
        messages = [{"role": "user", "content": [{"type": "text", "text": "why is the sky blue"}]}]
        r = await client.post("/v1/chat/completions", json={"messages": messages})
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {
            "role": "assistant",
            "content": " why is the sky blue",
        }
        prompt = workers[0].prompts[0]  # <s> <|user|> why is the sky blue <|assistant|>
        assert prompt[0] == VOCAB["<s>"] and prompt[-1] == VOCAB["<|assistant|>"]
        assert body["usage"]["prompt_tokens"] == len(prompt) == 8


async def test_streamed_chat_completion() -> None:
    async with serving("prefill", "decode") as (client, _):
        body = {"messages": [{"role": "user", "content": "hello"}], "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            chunks = await events(r)
        assert chunks[-1] == "[DONE]"
        assert chunks[0]["object"] == "chat.completion.chunk"
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": " hello"}
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


async def test_decode_racing_ahead_still_streams_in_order() -> None:
    async with serving("prefill", "decode") as (client, workers):
        workers[0].knobs.decode_first = True
        body = {"prompt": "the cat sat on a mat", "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            chunks = await events(r)
        text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
        assert text == " the cat sat on a mat"


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"prompt": "hi", "temperature": 3}, "temperature", "must be in [0, 2]"),
        ({"max_tokens": 3}, "prompt", "Field required"),
        ({"prompt": "hi", "n": 1000}, "n", "must be in [1, 16]"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs", "at most 20 alternatives"),
        ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias", "keys are token ids"),
        ({"prompt": "hi", "logit_bias": {"999": 1}}, "logit_bias", "[999] are not token ids"),
        ({"prompt": "hi", "echo": True}, "echo", "not supported"),
        ({"prompt": []}, "prompt", "must not be empty"),
        ({"prompt": [1, 999]}, "prompt", "[999] are not token ids"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": "the cat", "max_tokens": 30}, "max_tokens", "maximum context length is 32"),
        ({"prompt": [6] * 40}, "prompt", "the prompt has 40 tokens"),
        ({"prompt": "hi", "stop": [""]}, "stop", "must not be empty"),
    ],
)
async def test_bad_completion_requests_are_400_with_an_openai_error(body, param, message) -> None:
    async with serving("colocated") as (client, workers):
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
        assert message in error["message"]
        assert workers[0].prompts == []


async def test_bad_chat_requests_and_bodies_are_400() -> None:
    async with serving("colocated") as (client, _):
        for body, message in [
            ({"messages": []}, "messages"),
            ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role robot"),
            ({"messages": [{"content": "hi"}]}, "messages.0.role"),
        ]:
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        r = await client.post("/v1/completions", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


async def test_another_model_is_404() -> None:
    async with serving("colocated") as (client, _):
        r = await client.post("/v1/completions", json={"prompt": "hi", "model": "gpt-9"})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        assert "ask for 'tiny-echo@0123abcd', 'tiny-echo'" in r.json()["error"]["message"]


async def test_a_failed_handoff_is_a_500_with_the_reason() -> None:
    async with serving("prefill", "decode") as (client, workers):
        workers[0].knobs.fail_handoff = True
        r = await client.post("/v1/completions", json={"prompt": "the cat sat"})
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["type"] == "server_error"
        assert "could not hand the request to decode instance" in error["message"]
        assert "decode instance unreachable" in error["message"]


async def test_a_failure_mid_stream_is_an_error_event() -> None:
    async with serving("prefill", "decode") as (client, workers):
        workers[0].knobs.fail_handoff = True
        body = {"prompt": "the cat sat", "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            chunks = await events(r)
        assert chunks[0]["choices"][0]["text"] == " the"
        assert "decode instance unreachable" in chunks[1]["error"]["message"]
        assert chunks[2] == "[DONE]"


async def test_a_client_that_disconnects_mid_stream_aborts_on_prefill_and_decode() -> None:
    async with serving("prefill", "decode") as (client, (p, d)):
        d.knobs.step_s = 0.2
        body = {"prompt": "the cat sat on a mat", "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    request_id = json.loads(line.removeprefix("data: "))["id"]
                    break
        await wait_until(lambda: request_id in p.aborted and request_id in d.aborted)


async def test_a_client_that_gives_up_on_a_plain_request_aborts_it() -> None:
    async with serving("prefill", "decode") as (client, (p, d)):
        d.knobs.step_s = 0.2
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/completions", json={"prompt": "the cat sat"}, timeout=0.3)
        await wait_until(lambda: len(p.aborted) == 1 and d.aborted == p.aborted)


async def test_models_health_and_status() -> None:
    async with serving("prefill", "decode") as (client, workers):
        await client.post("/v1/completions", json={"prompt": "the cat"})
        models = (await client.get("/v1/models")).json()
        assert models["data"][0]["id"] == MODEL_ID
        assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
        assert (await client.get("/health")).status_code == 200
        for _ in range(100):  # the handoff event may come after the last token
            status = (await client.get("/status")).json()
            if status["handoffs"]["num_handoffs"]:
                break
        assert [i["role"] for i in status["instances"]] == ["prefill", "decode"]
        assert status["instances"][1]["kv_bytes_sent"] == 2**40
        assert status["instances"][1]["num_free_blocks"] == 60
        assert status["handoffs"]["kv_bytes_per_request"] == 3000
        assert workers[0].invariants_checked == 0
        await client.get("/status", params={"check_invariants": "true"})
        assert workers[0].invariants_checked == workers[1].invariants_checked == 1


async def test_the_completion_routes_are_documented_and_take_only_post() -> None:
    async with serving("colocated") as (client, _):
        schema = (await client.get("/openapi.json")).json()
        for path, body in [
            ("/v1/completions", "CompletionRequest"),
            ("/v1/chat/completions", "ChatCompletionRequest"),
        ]:
            request_body = schema["paths"][path]["post"]["requestBody"]
            assert request_body["content"]["application/json"]["schema"]["$ref"].endswith(body)
            r = await client.get(path)
            assert r.status_code == 405 and r.headers["allow"] == "POST"
