"""The calls a request makes to its workers, and what the router keeps of it meanwhile.

    colocated       Generate on the instance; every token comes on its Subscribe stream
    disaggregated   Prefill on the prefill instance, naming the decode instance:
                      first_token  ─▶ the request's stream (index 0)
                      handoff      ─▶ on_handoff (the KV bytes and seconds)
                      failure      ─▶ an error on the request's stream
    abort           Abort on every instance that may hold the request

A worker that cannot be reached, or a prefill stream that ends without a handoff,
fails the request's stream with the reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from proto.tandem.internal.v1 import worker_pb2
from router.instances import Instance, rpc_reason
from router.policy import Route
from router.status import HandoffRecord
from router.streams import RequestStream

logger = logging.getLogger(__name__)


@dataclass
class InFlight:
    request_id: str
    route: Route
    stream: RequestStream
    num_prompt_tokens: int
    waiting: bool = True  # no token yet: its prompt counts against the admission bound
    prefill_task: asyncio.Task[None] | None = None
    handoff: HandoffRecord | None = None
    migrating_to: str | None = None  # a decode instance it is being migrated to
    moved_from: set[str] = field(default_factory=set)  # decode instances it left


async def dispatch(
    request: InFlight,
    instances: Mapping[str, Instance],
    generate: worker_pb2.GenerateRequest,
    timeout_s: float,
    spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    on_handoff: Callable[[HandoffRecord], None],
) -> None:
    """Sends the request to its route: Generate on a colocated instance (answered once it
    is queued there), or a Prefill stream naming the decode instance, run by a task."""
    decode = instances[request.route.decode_id]
    if request.route.prefill_id is None:
        await generate_colocated(request, decode, generate, timeout_s)
        return
    prefill = instances[request.route.prefill_id]
    prefill_request = worker_pb2.PrefillRequest(
        request_id=generate.request_id,
        prompt_token_ids=generate.prompt_token_ids,
        params=generate.params,
        decode=decode.peer(),
        router_id=generate.router_id,
    )
    request.prefill_task = spawn(run_prefill(request, prefill, decode, prefill_request, on_handoff))


async def generate_colocated(
    request: InFlight,
    instance: Instance,
    generate_request: worker_pb2.GenerateRequest,
    timeout_s: float,
) -> None:
    try:
        await instance.stub.Generate(generate_request, timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        request.stream.fail(f"{instance} did not take the request ({rpc_reason(e)})")


async def run_prefill(
    request: InFlight,
    prefill: Instance,
    decode: Instance,
    prefill_request: worker_pb2.PrefillRequest,
    on_handoff: Callable[[HandoffRecord], None],
) -> None:
    call = prefill.stub.Prefill(prefill_request)
    try:
        async for event in call:
            kind = event.WhichOneof("event")
            if kind == "first_token":
                request.stream.push(event.first_token)
            elif kind == "handoff":
                request.handoff = HandoffRecord(
                    request.request_id,
                    prefill.instance_id,
                    decode.instance_id,
                    event.handoff.kv_bytes,
                    event.handoff.seconds,
                )
                on_handoff(request.handoff)
            elif kind == "failure":
                request.stream.fail(
                    f"{prefill} could not hand the request to {decode} "
                    f"({event.failure.code}: {event.failure.message})"
                )
    except grpc.aio.AioRpcError as e:
        request.stream.fail(f"{prefill} failed the prefill ({rpc_reason(e)})")
    finally:
        call.cancel()
    if request.handoff is None:  # a no-op when the stream is already closed
        request.stream.fail(f"{prefill} ended the prefill without handing the request off")


async def abort_on(
    instances: Sequence[Instance], request_id: str, reason: str, timeout_s: float
) -> None:
    abort = worker_pb2.AbortRequest(request_id=request_id, reason=reason)

    async def one(instance: Instance) -> None:
        try:
            await instance.stub.Abort(abort, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            logger.warning("Abort(%s) on %s failed: %s", request_id, instance, rpc_reason(e))

    await asyncio.gather(*(one(i) for i in instances))
