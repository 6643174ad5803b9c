"""The calls a request makes to its workers, and what the router keeps of it meanwhile.

    colocated       Generate on the instance; every token comes on its Subscribe stream
    disaggregated   Prefill on the prefill instance, naming the decode instance:
                      first_token  ─▶ the request's stream
                      handoff      ─▶ on_handoff (the KV bytes and seconds)
                      failure      ─▶ on_failure
    abort           Abort on every instance that may hold the request

A worker that cannot be reached, or a prefill stream that ends without a handoff,
is reported to on_failure(request, attempt, instance id, message, retryable):
retryable when the instance named is gone (UNAVAILABLE), so that the router may
resume the request elsewhere (Router._resume). `attempt` tells a report of an
attempt the router has already given up on from one of the current attempt.
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


# What a worker reports when it is gone: the request may be resumed on another one.
_GONE = ("UNAVAILABLE",)


@dataclass
class InFlight:
    request_id: str
    route: Route
    stream: RequestStream
    num_prompt_tokens: int
    generate: worker_pb2.GenerateRequest  # as first sent: prompt, params
    attempt: int = 0  # how many times it was resumed after a worker died
    waiting: bool = True  # no token yet: its prompt counts against the admission bound
    prompt_pending: bool = True  # its route's first instance has its prompt queued

    @property
    def worker_id(self) -> str:
        """The id its workers know it by: a resumed request gets a fresh one, so that
        what is left of an attempt given up on cannot be taken for the current one."""
        return self.request_id if not self.attempt else f"{self.request_id}@{self.attempt}"

    prefill_task: asyncio.Task[None] | None = None
    handoff: HandoffRecord | None = None
    migrating_to: str | None = None  # a decode instance it is being migrated to
    moved_from: set[str] = field(default_factory=set)  # decode instances it left


OnFailure = Callable[[InFlight, int, str, str, bool], None]


async def dispatch(
    request: InFlight,
    instances: Mapping[str, Instance],
    generate: worker_pb2.GenerateRequest,
    timeout_s: float,
    spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    on_handoff: Callable[[HandoffRecord], None],
    on_failure: OnFailure,
) -> None:
    """Sends the request to its route: Generate on a colocated instance (answered once it
    is queued there), or a Prefill stream naming the decode instance, run by a task."""
    decode = instances[request.route.decode_id]
    if request.route.prefill_id is None:
        await generate_colocated(request, decode, generate, timeout_s, on_failure)
        return
    prefill = instances[request.route.prefill_id]
    prefill_request = worker_pb2.PrefillRequest(
        request_id=generate.request_id,
        prompt_token_ids=generate.prompt_token_ids,
        params=generate.params,
        decode=decode.peer(),
        router_id=generate.router_id,
        output_token_ids=generate.output_token_ids,
    )
    request.prefill_task = spawn(
        run_prefill(request, prefill, decode, prefill_request, on_handoff, on_failure)
    )


async def generate_colocated(
    request: InFlight,
    instance: Instance,
    generate_request: worker_pb2.GenerateRequest,
    timeout_s: float,
    on_failure: OnFailure,
) -> None:
    attempt = request.attempt
    try:
        await instance.stub.Generate(generate_request, timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        message = f"{instance} did not take the request ({rpc_reason(e)})"
        on_failure(request, attempt, instance.instance_id, message, e.code().name in _GONE)


async def run_prefill(
    request: InFlight,
    prefill: Instance,
    decode: Instance,
    prefill_request: worker_pb2.PrefillRequest,
    on_handoff: Callable[[HandoffRecord], None],
    on_failure: OnFailure,
) -> None:
    attempt = request.attempt
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
                message = (
                    f"{prefill} could not hand the request to {decode} "
                    f"({event.failure.code}: {event.failure.message})"
                )
                # A handoff fails UNAVAILABLE when the decode instance is gone.
                gone = event.failure.code in _GONE
                on_failure(request, attempt, decode.instance_id, message, gone)
                return
    except grpc.aio.AioRpcError as e:
        message = f"{prefill} failed the prefill ({rpc_reason(e)})"
        on_failure(request, attempt, prefill.instance_id, message, e.code().name in _GONE)
        return
    finally:
        call.cancel()
    if request.handoff is None and not request.stream.closed:
        message = f"{prefill} ended the prefill without handing the request off"
        on_failure(request, attempt, prefill.instance_id, message, False)


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
