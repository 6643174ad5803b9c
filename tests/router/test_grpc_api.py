"""The public gRPC API (tandem.v1.Tandem, health, reflection, API keys) over a real
loopback port, on fake workers; tests/router/test_client.py drives it through the SDK."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from proto.tandem.internal.v1 import worker_pb2
from proto.tandem.v1 import tandem_pb2, tandem_pb2_grpc
from tests.router.fakes import MODEL_ID, VOCAB, FakeWorker, served_api, wait_until

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def serving(
    *roles: str,
) -> AsyncIterator[tuple[tandem_pb2_grpc.TandemStub, list[FakeWorker]]]:
    async with (
        served_api(*roles) as api,
        grpc.aio.insecure_channel(api.target) as channel,
    ):
        yield tandem_pb2_grpc.TandemStub(channel), api.workers


async def test_generate_from_text() -> None:
    async with serving("prefill", "decode") as (stub, _):
        reply = await stub.Generate(tandem_pb2.GenerateRequest(prompt="the cat sat"))
        assert reply.text == " the cat sat" and reply.finish_reason == "stop"
        assert list(reply.token_ids) == [VOCAB[w] for w in ("the", "cat", "sat")]
        assert reply.id.startswith("cmpl-") and reply.model == MODEL_ID
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, 3)
        assert reply.usage.total_tokens == 7


async def test_generate_stream_from_token_ids() -> None:
    async with serving("colocated") as (stub, _):
        ids = [VOCAB[w] for w in ("hello", "world", "the")]
        request = tandem_pb2.GenerateRequest(
            prompt_token_ids=ids, params=tandem_pb2.SamplingParams(max_tokens=2)
        )
        pieces = [p async for p in stub.GenerateStream(request)]
        assert [p.index for p in pieces] == [0, 1]
        assert "".join(p.text for p in pieces) == " hello world"
        assert [p.finish_reason for p in pieces] == ["", "length"]
        assert not pieces[0].HasField("usage") and pieces[-1].usage.completion_tokens == 2


async def rpc_error(
    stub: tandem_pb2_grpc.TandemStub, request: tandem_pb2.GenerateRequest, streaming: bool
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        if streaming:
            async for _ in stub.GenerateStream(request):
                pass
        else:
            await stub.Generate(request)
    return error.value


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (
            tandem_pb2.GenerateRequest(
                prompt="hi", params=tandem_pb2.SamplingParams(temperature=5)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'temperature': must be in [0, 2]",
        ),
        (tandem_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "must not be empty"),
        (
            tandem_pb2.GenerateRequest(prompt="hi", model="gpt-9"),
            grpc.StatusCode.NOT_FOUND,
            "ask for 'tiny-echo@0123abcd', 'tiny-echo', 'default'",
        ),
        (
            tandem_pb2.GenerateRequest(prompt="hi", prompt_token_ids=[6]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not both",
        ),
    ],
)
async def test_bad_requests_come_back_as_status_codes_with_their_message(
    request_, code, message, streaming
) -> None:
    async with serving("colocated") as (stub, _):
        error = await rpc_error(stub, request_, streaming)
        assert error.code() == code and message in error.details()


async def test_a_failed_handoff_is_internal_with_the_reason() -> None:
    async with serving("prefill", "decode") as (stub, workers):
        workers[0].knobs.fail_handoff = True
        error = await rpc_error(stub, tandem_pb2.GenerateRequest(prompt="the cat"), False)
        assert error.code() == grpc.StatusCode.INTERNAL
        assert "decode instance unreachable" in error.details()


async def test_cancelling_a_stream_aborts_on_prefill_and_decode() -> None:
    async with serving("prefill", "decode") as (stub, (p, d)):
        d.knobs.step_s = 0.2
        call = stub.GenerateStream(tandem_pb2.GenerateRequest(prompt="the cat sat on a mat"))
        first = await call.read()
        call.cancel()
        await wait_until(lambda: first.id in p.aborted and first.id in d.aborted)


async def test_the_client_request_id_is_echoed_and_the_router_keeps_its_own() -> None:
    async with serving("colocated") as (stub, _):
        request = tandem_pb2.GenerateRequest(prompt="the cat", request_id="mine-1")
        reply = await stub.Generate(request)
        pieces = [p async for p in stub.GenerateStream(request)]
        assert reply.request_id == "mine-1" and reply.id.startswith("cmpl-")
        assert [p.request_id for p in pieces] == ["mine-1", "mine-1"]
        assert pieces[0].id.startswith("cmpl-") and pieces[0].id != reply.id


async def test_chat_renders_the_template_and_streams_the_reply() -> None:
    async with serving("prefill", "decode") as (stub, (p, _)):
        messages = [tandem_pb2.ChatMessage(role="user", content="why is the sky blue")]
        reply = await stub.Chat(tandem_pb2.ChatRequest(messages=messages, request_id="c1"))
        # <s> <|user|> why is the sky blue <|assistant|>: the fake echoes the words.
        assert p.prompts[0][:2] == [VOCAB["<s>"], VOCAB["<|user|>"]]
        assert p.prompts[0][-1] == VOCAB["<|assistant|>"]
        assert reply.text == " why is the sky blue" and reply.request_id == "c1"
        assert reply.usage.prompt_tokens == 8
        pieces = [x async for x in stub.ChatStream(tandem_pb2.ChatRequest(messages=messages))]
        assert "".join(x.text for x in pieces) == reply.text


async def test_chat_with_an_unknown_role_is_invalid_argument() -> None:
    async with serving("colocated") as (stub, _):
        messages = [tandem_pb2.ChatMessage(role="robot", content="hi")]
        error = await rpc_error_of(stub.Chat(tandem_pb2.ChatRequest(messages=messages)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown role robot" in error.details()


async def rpc_error_of(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


async def test_abort_by_id_ends_the_stream_and_the_request_on_the_workers() -> None:
    async with serving("prefill", "decode") as (stub, (_, d)):
        d.knobs.step_s = 0.2
        call = stub.GenerateStream(tandem_pb2.GenerateRequest(prompt="the cat sat on a mat"))
        first = await call.read()
        assert (await stub.Abort(tandem_pb2.AbortRequest(id=first.id))).found
        last = first
        while (piece := await call.read()) is not grpc.aio.EOF:
            last = piece
        assert last.finish_reason == "abort"
        await wait_until(lambda: first.id in d.aborted)
        assert not (await stub.Abort(tandem_pb2.AbortRequest(id=first.id))).found


async def test_list_models_names_the_model_and_its_aliases() -> None:
    async with serving("colocated") as (stub, _):
        reply = await stub.ListModels(tandem_pb2.ListModelsRequest())
        (model,) = reply.models
        assert (model.id, model.owned_by, model.max_model_len) == (MODEL_ID, "tandem", 32)
        assert list(model.aliases) == ["tiny-echo", "default"]


async def test_logprobs_are_asked_of_the_workers_and_passed_back(monkeypatch) -> None:
    async with served_api("colocated") as api:
        asked = []
        generate = api.router.generate

        async def with_logprobs(ids, params):
            asked.append(params.logprobs if params.HasField("logprobs") else None)
            async for delta in generate(ids, params):
                for token_id in delta.token_ids:
                    top = [worker_pb2.TopLogprob(token_id=token_id, logprob=-0.5)]
                    delta.logprobs.add(token_id=token_id, logprob=-0.5, rank=1, top=top)
                yield delta

        monkeypatch.setattr(api.router, "generate", with_logprobs)
        async with grpc.aio.insecure_channel(api.target) as channel:
            stub = tandem_pb2_grpc.TandemStub(channel)
            params = tandem_pb2.SamplingParams(logprobs=1)
            reply = await stub.Generate(tandem_pb2.GenerateRequest(prompt="the cat", params=params))
            assert [(e.token_id, e.logprob, e.rank) for e in reply.logprobs] == [
                (VOCAB["the"], -0.5, 1),
                (VOCAB["cat"], -0.5, 1),
            ]
            assert reply.logprobs[1].top[0].token_id == VOCAB["cat"]
            await stub.Generate(tandem_pb2.GenerateRequest(prompt="the cat"))
            assert asked == [1, None]
            too_many = tandem_pb2.GenerateRequest(
                prompt="the", params=tandem_pb2.SamplingParams(logprobs=21)
            )
            error = await rpc_error_of(stub.Generate(too_many))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "'logprobs': must be in [0, 20]" in error.details()


async def health_of(target: str, service: str) -> health_pb2.HealthCheckResponse.ServingStatus:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


async def test_health_is_serving_until_set_otherwise_and_not_serving_once_stopping() -> None:
    serving_, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    async with served_api("colocated") as api:
        for service in ("", "tandem.v1.Tandem"):
            assert await health_of(api.target, service) == serving_
        await api.server.set_serving(False)
        for service in ("", "tandem.v1.Tandem"):
            assert await health_of(api.target, service) == not_serving
        await api.server.set_serving(True)
        assert await health_of(api.target, "tandem.v1.Tandem") == serving_
        # stop() tells the watchers NOT_SERVING as its grace period begins.
        async with grpc.aio.insecure_channel(api.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == serving_
            stopping = asyncio.ensure_future(api.server.stop(grace=0.5))
            assert (await watch.read()).status == not_serving
            await stopping


def generate_by_reflection(target: str, prompt: str) -> tuple[list[str], dict[str, str]]:
    """Discover tandem.v1.Tandem by server reflection and call Generate with messages
    built from the reflected descriptors: no generated stubs."""
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("tandem.v1.Tandem").methods_by_name["Generate"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        generate = channel.unary_unary(
            "/tandem.v1.Tandem/Generate",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        reply = generate(request_class(prompt=prompt, request_id="reflected"), timeout=10)
        assert response_class is not tandem_pb2.GenerateResponse
        return services, {f.name: v for f, v in reply.ListFields() if f.type == f.TYPE_STRING}


async def test_a_client_with_only_reflection_can_call_generate() -> None:
    async with served_api("colocated") as api:
        services, reply = await asyncio.to_thread(generate_by_reflection, api.target, "the cat")
        assert services == [
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "tandem.v1.Tandem",
        ]
        assert reply["text"] == " the cat" and reply["request_id"] == "reflected"
        assert reply["model"] == MODEL_ID and reply["finish_reason"] == "stop"


async def test_with_api_keys_health_and_reflection_stay_open_and_the_rest_is_refused() -> None:
    async with served_api("colocated", api_keys=["k1", "k2"]) as api:
        assert await health_of(api.target, "") == health_pb2.HealthCheckResponse.SERVING
        services, _ = await asyncio.to_thread(_services_by_reflection, api.target)
        assert "tandem.v1.Tandem" in services
        async with grpc.aio.insecure_channel(api.target) as channel:
            stub = tandem_pb2_grpc.TandemStub(channel)
            request = tandem_pb2.GenerateRequest(prompt="the cat")
            error = await rpc_error_of(stub.Generate(request))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "'authorization: Bearer <key>'" in error.details()
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                async for _ in stub.GenerateStream(request, metadata=[("authorization", "k1")]):
                    pass
            assert streamed.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "is not 'Bearer <key>'" in streamed.value.details()
            wrong = [("authorization", "Bearer k3")]
            error = await rpc_error_of(
                stub.ListModels(tandem_pb2.ListModelsRequest(), metadata=wrong)
            )
            assert "not one of this server's keys" in error.details()
            right = [("authorization", "Bearer k2")]
            assert (await stub.Generate(request, metadata=right)).text == " the cat"


def _services_by_reflection(target: str) -> tuple[list[str], None]:
    with grpc.insecure_channel(target) as channel:
        return sorted(ProtoReflectionDescriptorDatabase(channel).get_services()), None
