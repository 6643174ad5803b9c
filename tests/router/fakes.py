"""In-process fake workers for the router's tests: real gRPC servers with scripted tokens.

A fake echoes the prompt's word tokens (its special tokens left out), one token per
step, up to max_tokens. A fake prefill instance sends the first token, starts the rest
on the fake decode instance named in the request, and reports the handoff. Knobs make
it fail the handoff, or let the decode instance's tokens race ahead of the first one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import uvicorn
from fastapi import FastAPI
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing

from proto.tandem.internal.v1 import worker_pb2, worker_pb2_grpc
from router.config import RouterConfig
from router.core import Router

SPECIAL_TOKENS = ["[UNK]", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = ["hello", "world", "the", "cat", "sat", "on", "a", "mat", "why", "is", "sky", "blue"]
VOCAB = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m.role) }}{% endif %}"
    "<|{{ m.role }}|> {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MODEL_ID = "tiny-echo@0123abcd"  # name@digest, as the engine writes it
MAX_MODEL_LEN = 32


def tokenizer_json() -> str:
    tokenizer = Tokenizer(WordLevel(VOCAB, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer.to_str()


def tokenizer_config(chat_template: str | None = CHAT_TEMPLATE) -> dict:
    config: dict = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}}
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def echo(prompt_token_ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    """What a fake generates for a prompt: its word tokens, and why it stops."""
    words = [t for t in prompt_token_ids if t >= len(SPECIAL_TOKENS)]
    return words[:max_tokens], "length" if len(words) >= max_tokens else "stop"


def text_of(token_ids: list[int]) -> str:
    words = {i: t for t, i in VOCAB.items()}
    return "".join(f" {words[t]}" for t in token_ids)


@dataclass
class Knobs:
    step_s: float = 0.0  # time between two tokens of the decode side
    fail_handoff: bool = False  # prefill: a failure event instead of the handoff
    decode_first: bool = False  # prefill: the decode side finishes before the first token
    first_token_s: float = 0.0  # prefill: time before the first token
    # prefill: the decode side reports the handoff broken (as when this worker dies
    # mid-transfer), and the prefill stream never ends
    handoff_broken: bool = False


class FakeWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self, role: str, instance_id: str, registry: dict[str, FakeWorker]) -> None:
        self.role = role
        self.instance_id = instance_id
        self.knobs = Knobs()
        self.aborted: list[str] = []
        self.prompts: list[list[int]] = []
        self.resumed: list[list[int]] = []  # each call's output_token_ids
        self.invariants_checked = 0
        self._registry = registry
        self._subscribers: dict[str, asyncio.Queue[worker_pb2.StepBatch | None]] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self.server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        registry[self.address] = self

    async def Info(self, request, context):
        return worker_pb2.InstanceInfo(
            instance_id=self.instance_id,
            role=self.role,
            model_id=MODEL_ID,
            max_model_len=MAX_MODEL_LEN,
            vocab_size=len(VOCAB),
            eos_token_ids=[VOCAB["</s>"]],
            tokenizer_json=tokenizer_json().encode(),
            tokenizer_config_json=json.dumps(tokenizer_config()),
        )

    async def Status(self, request, context):
        self.invariants_checked += request.check_invariants
        return worker_pb2.InstanceStatus(
            instance_id=self.instance_id,
            role=self.role,
            num_blocks=64,
            num_free_blocks=60,
            kv_bytes_sent=2**40,  # more than 32 bits, kept a number in /status
            handoffs_completed=3,
            links=[worker_pb2.LinkStats(link_id="l0", bytes_sent=7)],
        )

    async def Subscribe(self, request, context):
        queue: asyncio.Queue[worker_pb2.StepBatch | None] = asyncio.Queue()
        self._subscribers[request.router_id] = queue
        await context.send_initial_metadata(())
        try:
            while (batch := await queue.get()) is not None:
                yield batch
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the worker is restarting")
        finally:
            self._subscribers.pop(request.router_id, None)

    async def Prefill(self, request, context):
        self.prompts.append(list(request.prompt_token_ids))
        self.resumed.append(list(request.output_token_ids))
        await asyncio.sleep(self.knobs.first_token_s)
        ids, reason = echo(list(request.prompt_token_ids), request.params.max_tokens)
        done = len(request.output_token_ids)  # a resumed request goes on from there
        first = _delta(request.request_id, done, ids, reason)
        decode = self._registry[request.decode.address]
        if self.knobs.handoff_broken:
            broken = worker_pb2.TokenDelta(
                request_id=request.request_id,
                index=done,
                finished=True,
                finish_reason="error",
                error="the KV handoff failed (KV transfer failed: connection reset by peer)",
            )
            decode._subscribers[request.router_id].put_nowait(worker_pb2.StepBatch(deltas=[broken]))
            await asyncio.Event().wait()  # its process died: nothing more comes
        if self.knobs.fail_handoff:
            yield worker_pb2.PrefillEvent(first_token=first)
            failure = worker_pb2.Failure(code="UNAVAILABLE", message="decode instance unreachable")
            yield worker_pb2.PrefillEvent(failure=failure)
            return
        if not first.finished:
            decode.start(request.request_id, request.router_id, ids, reason, start=done + 1)
            if self.knobs.decode_first:
                await decode._running[request.request_id]
        yield worker_pb2.PrefillEvent(first_token=first)
        handoff = worker_pb2.HandoffDone(kv_bytes=1000 * len(request.prompt_token_ids), seconds=0.5)
        yield worker_pb2.PrefillEvent(handoff=handoff)

    async def Generate(self, request, context):
        self.prompts.append(list(request.prompt_token_ids))
        self.resumed.append(list(request.output_token_ids))
        ids, reason = echo(list(request.prompt_token_ids), request.params.max_tokens)
        start = len(request.output_token_ids)
        self.start(request.request_id, request.router_id, ids, reason, start=start)
        return worker_pb2.GenerateReply()

    async def Abort(self, request, context):
        self.aborted.append(request.request_id)
        task = self._running.pop(request.request_id, None)
        if task is not None:
            task.cancel()
        return worker_pb2.AbortReply(found=task is not None)

    def start(self, request_id: str, router_id: str, ids: list[int], reason: str, start: int):
        task = asyncio.ensure_future(self._decode(request_id, router_id, ids, reason, start))
        self._running[request_id] = task

    def break_streams(self) -> None:
        """End every Subscribe stream with UNAVAILABLE, as a restarting worker would."""
        for queue in self._subscribers.values():
            queue.put_nowait(None)

    def is_subscribed(self, router_id: str) -> bool:
        return router_id in self._subscribers

    async def _decode(self, request_id, router_id, ids, reason, start) -> None:
        for index in range(start, max(len(ids), start + 1)):
            await asyncio.sleep(self.knobs.step_s)
            batch = worker_pb2.StepBatch(deltas=[_delta(request_id, index, ids, reason)])
            self._subscribers[router_id].put_nowait(batch)
        self._running.pop(request_id, None)


def _delta(request_id: str, index: int, ids: list[int], reason: str) -> worker_pb2.TokenDelta:
    """Token `index` of `ids` (none if `ids` is empty), finished if it is the last."""
    token_ids = ids[index : index + 1]
    finished = index >= len(ids) - 1
    return worker_pb2.TokenDelta(
        request_id=request_id,
        index=index,
        token_ids=token_ids,
        text=text_of(token_ids),
        finished=finished,
        finish_reason=reason if finished else "",
    )


@contextlib.asynccontextmanager
async def fake_workers(*roles: str) -> AsyncIterator[list[FakeWorker]]:
    """One started fake worker per role ("prefill", "decode", "colocated")."""
    registry: dict[str, FakeWorker] = {}
    workers = [FakeWorker(role, f"{role}-{i}", registry) for i, role in enumerate(roles)]
    for worker in workers:
        await worker.server.start()
    try:
        yield workers
    finally:
        await asyncio.gather(*(w.server.stop(None) for w in workers))


@contextlib.asynccontextmanager
async def started_router(workers: list[FakeWorker], **config) -> AsyncIterator[Router]:
    config.setdefault("connect_timeout_s", 5.0)
    config.setdefault("reconnect_backoff_s", (0.05, 0.2))
    async with Router([w.address for w in workers], config=RouterConfig(**config)) as router:
        yield router


@contextlib.asynccontextmanager
async def http_server(app: FastAPI) -> AsyncIterator[str]:
    """The app on a real loopback port, served by uvicorn; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await serving
        sock.close()


async def wait_until(condition, timeout_s: float = 3.0) -> None:
    """Poll `condition()` until it holds; fail the test after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        await asyncio.sleep(0.01)


# The public gRPC API's fakes (added after the rest, so imported here).
from router.grpc_api import TandemGrpcServer, start_grpc_server  # noqa: E402


@dataclass
class ServedApi:
    """The public gRPC API of a router on fake workers, on a loopback port."""

    target: str
    router: Router
    workers: list[FakeWorker]
    server: TandemGrpcServer


@contextlib.asynccontextmanager
async def served_api(*roles: str, **server_options) -> AsyncIterator[ServedApi]:
    """start_grpc_server (with `server_options`: api_keys, tls) over a router on one fake
    worker per role; stopped on exit."""
    async with fake_workers(*roles) as workers, started_router(workers) as router:
        server = await start_grpc_server(router, "127.0.0.1", 0, **server_options)
        try:
            yield ServedApi(f"127.0.0.1:{server.port}", router, workers, server)
        finally:
            await server.stop(None)
