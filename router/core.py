"""The router: sends each request to its workers and streams its tokens back in order.

A request's life on the router (disaggregated):

    generate() ─▶ policy picks prefill P and decode D ─▶ P.Prefill(decode=D) stream:
        first_token ─▶ the request's stream (index 0)
        handoff     ─▶ the handoff log (kv_bytes, seconds)
        failure     ─▶ an error delta; Abort on P and D
    D's Subscribe stream ─▶ tokens 1, 2, ... ─▶ the request's stream ─▶ the caller,
    in index order, ending after the finished delta

A colocated request is one Generate call to instance C; all its tokens, from index 0,
come on C's Subscribe stream. If the caller stops early (closes the generator, or its
task is cancelled), or the request fails on the router's side, Abort goes to every
instance that may hold it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from proto.tandem.internal.v1 import worker_pb2
from router.errors import RouterError, RouterStartError
from router.instances import Instance, Subscription, connect, rpc_reason
from router.policy import Candidate, RoundRobinPolicy, Route, RoutingPolicy
from router.status import HandoffLog, HandoffRecord, message_to_dict
from router.streams import RequestStream
from router.tokenizer import RouterTokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    router_id: str = field(default_factory=lambda: f"router-{uuid.uuid4().hex[:12]}")
    connect_timeout_s: float = 30.0  # start(): each worker's Info and first token stream
    rpc_timeout_s: float = 10.0  # Generate, Abort and Status calls
    reconnect_backoff_s: tuple[float, float] = (0.1, 5.0)  # first and longest wait
    max_message_bytes: int = 64 << 20  # Info carries the tokenizer: several MB


@dataclass
class _InFlight:
    request_id: str
    route: Route
    stream: RequestStream
    prefill_task: asyncio.Task[None] | None = None
    handoff: HandoffRecord | None = None


class Router:
    """Routes requests to a fixed set of workers, given by address.

        async with Router(["127.0.0.1:7001", "127.0.0.1:7002"]) as router:
            async with contextlib.aclosing(router.generate(ids, params)) as deltas:
                async for delta in deltas:
                    ...

    One Router serves many concurrent requests on one asyncio loop.
    """

    def __init__(
        self,
        worker_addresses: Sequence[str],
        policy: RoutingPolicy | None = None,
        config: RouterConfig | None = None,
    ) -> None:
        if not worker_addresses:
            raise ValueError("the router needs at least one worker address")
        self._addresses = list(worker_addresses)
        self._policy = policy or RoundRobinPolicy()
        self.config = config or RouterConfig()
        self.handoffs = HandoffLog()
        self._instances: dict[str, Instance] = {}
        self._in_flight: dict[str, _InFlight] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._aborts: set[asyncio.Task[Any]] = set()  # also in _tasks
        self._tokenizer: RouterTokenizer | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Ask every worker for its Info, then open the token streams. Raises
        RouterStartError if a worker cannot be reached or they serve different models."""
        try:
            await self._connect_all()
            first = self._instances[next(iter(self._instances))]
            self._tokenizer = RouterTokenizer.from_info(first.info)
            self._subscribe_all()
            await self._wait_streams_open()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        # Let the aborts already on their way reach the workers; stop everything else.
        if self._aborts:
            await asyncio.wait(self._aborts, timeout=self.config.rpc_timeout_s)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(i.channel.close() for i in self._instances.values()))

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- what the front doors need ------------------------------------------------------

    @property
    def tokenizer(self) -> RouterTokenizer:
        if self._tokenizer is None:
            raise RouterError("the router is not started: await router.start() first")
        return self._tokenizer

    @property
    def _model_info(self) -> worker_pb2.InstanceInfo:
        if not self._instances:
            raise RouterError("the router is not started: await router.start() first")
        return next(iter(self._instances.values())).info

    @property
    def model_id(self) -> str:
        return self._model_info.model_id

    @property
    def max_model_len(self) -> int:
        return self._model_info.max_model_len

    @property
    def vocab_size(self) -> int:
        return self._model_info.vocab_size

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    async def generate(
        self, prompt_token_ids: Sequence[int], params: worker_pb2.SamplingParams
    ) -> AsyncGenerator[worker_pb2.TokenDelta, None]:
        """The request's deltas in index order, ending after the finished one.

        A failure becomes a last delta with finish_reason "error" and `error` set.
        Raises NoInstanceError (on the first step) when no instance can take it. Close
        the generator (contextlib.aclosing) to stop early: that aborts on the workers.
        """
        route = self._choose_route(len(prompt_token_ids))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        request = _InFlight(request_id, route, RequestStream(request_id))
        self._in_flight[request.request_id] = request
        try:
            await self._dispatch(request, list(prompt_token_ids), params)
            while True:
                delta = await request.stream.get()
                yield delta
                if delta.finished:
                    return
        finally:
            self._end(request)

    async def status(self, check_invariants: bool = False) -> dict[str, Any]:
        """The workers' Status, the handoff totals and the requests in flight, as JSON.
        With check_invariants, each worker checks its KV cache and says what is wrong in
        `invariants_error`."""
        request = worker_pb2.StatusRequest(check_invariants=check_invariants)
        instances = await asyncio.gather(
            *(self._instance_status(i, request) for i in self._instances.values())
        )
        return {
            "router_id": self.config.router_id,
            "model": self.model_id,
            "num_in_flight": self.num_in_flight,
            "instances": instances,
            "handoffs": self.handoffs.summary(),
        }

    # -- starting ----------------------------------------------------------------------

    async def _connect_all(self) -> None:
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
        ]
        timeout = self.config.connect_timeout_s
        connected = await asyncio.gather(
            *(connect(a, timeout, options) for a in self._addresses), return_exceptions=True
        )
        for result in connected:
            if isinstance(result, Instance):
                self._instances[result.instance_id] = result
        errors = [r for r in connected if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        if len(self._instances) != len(self._addresses):
            raise RouterStartError("two workers reported the same instance_id")
        models = {i.info.model_id for i in self._instances.values()}
        if len(models) > 1:
            raise RouterStartError(f"the workers serve different models: {sorted(models)}")

    def _subscribe_all(self) -> None:
        for instance in self._instances.values():
            if instance.streams_tokens:
                subscription = Subscription(
                    instance,
                    self.config.router_id,
                    self._on_delta,
                    self._on_stream_broken,
                    self.config.reconnect_backoff_s,
                )
                self._spawn(subscription.run())

    async def _wait_streams_open(self) -> None:
        streaming = [i for i in self._instances.values() if i.streams_tokens]
        opened = asyncio.gather(*(i.stream_open.wait() for i in streaming))
        try:
            await asyncio.wait_for(opened, self.config.connect_timeout_s)
        except asyncio.TimeoutError as e:
            closed = ", ".join(str(i) for i in streaming if not i.stream_open.is_set())
            raise RouterStartError(
                f"the token stream (Subscribe) of {closed} did not open within "
                f"{self.config.connect_timeout_s:g} s; check the worker's log (its Subscribe "
                "must send initial metadata once it has registered the router)"
            ) from e

    # -- one request -------------------------------------------------------------------

    def _choose_route(self, num_prompt_tokens: int) -> Route:
        in_flight: dict[str, int] = {}
        for request in self._in_flight.values():
            for instance_id in (request.route.prefill_id, request.route.decode_id):
                if instance_id is not None:
                    in_flight[instance_id] = in_flight.get(instance_id, 0) + 1
        candidates = [
            Candidate(i.instance_id, i.role, in_flight.get(i.instance_id, 0))
            for i in self._instances.values()
            if i.healthy
        ]
        return self._policy.choose(num_prompt_tokens, candidates)

    async def _dispatch(
        self, request: _InFlight, prompt_token_ids: list[int], params: worker_pb2.SamplingParams
    ) -> None:
        decode = self._instances[request.route.decode_id]
        if request.route.prefill_id is None:
            await self._generate_colocated(request, decode, prompt_token_ids, params)
            return
        prefill = self._instances[request.route.prefill_id]
        prefill_request = worker_pb2.PrefillRequest(
            request_id=request.request_id,
            prompt_token_ids=prompt_token_ids,
            params=params,
            decode=decode.peer(),
            router_id=self.config.router_id,
        )
        request.prefill_task = self._spawn(self._run_prefill(request, prefill, prefill_request))

    async def _generate_colocated(
        self,
        request: _InFlight,
        instance: Instance,
        prompt_token_ids: list[int],
        params: worker_pb2.SamplingParams,
    ) -> None:
        generate_request = worker_pb2.GenerateRequest(
            request_id=request.request_id,
            prompt_token_ids=prompt_token_ids,
            params=params,
            router_id=self.config.router_id,
        )
        try:
            await instance.stub.Generate(generate_request, timeout=self.config.rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            request.stream.fail(f"{instance} did not take the request ({rpc_reason(e)})")

    async def _run_prefill(
        self, request: _InFlight, prefill: Instance, prefill_request: worker_pb2.PrefillRequest
    ) -> None:
        call = prefill.stub.Prefill(prefill_request)
        try:
            async for event in call:
                self._on_prefill_event(request, prefill, event)
        except grpc.aio.AioRpcError as e:
            request.stream.fail(f"{prefill} failed the prefill ({rpc_reason(e)})")
        finally:
            call.cancel()
        if request.handoff is None:  # a no-op when the stream is already closed
            request.stream.fail(f"{prefill} ended the prefill without handing the request off")

    def _on_prefill_event(
        self, request: _InFlight, prefill: Instance, event: worker_pb2.PrefillEvent
    ) -> None:
        kind = event.WhichOneof("event")
        if kind == "first_token":
            request.stream.push(event.first_token)
        elif kind == "handoff":
            request.handoff = HandoffRecord(
                request.request_id,
                prefill.instance_id,
                request.route.decode_id,
                event.handoff.kv_bytes,
                event.handoff.seconds,
            )
            self.handoffs.add(request.handoff)
        elif kind == "failure":
            decode = self._instances[request.route.decode_id]
            request.stream.fail(
                f"{prefill} could not hand the request to {decode} "
                f"({event.failure.code}: {event.failure.message})"
            )

    def _end(self, request: _InFlight) -> None:
        """Forget the request, and abort it on the workers unless a worker finished it."""
        self._in_flight.pop(request.request_id, None)
        if not request.stream.needs_abort:
            return  # its prefill stream ends by itself: the handoff event may still come
        if request.prefill_task is not None:
            request.prefill_task.cancel()
        abort = self._spawn(self._abort(request, "the client went away, or the request failed"))
        self._aborts.add(abort)
        abort.add_done_callback(self._aborts.discard)

    async def _abort(self, request: _InFlight, reason: str) -> None:
        instance_ids = [i for i in (request.route.prefill_id, request.route.decode_id) if i]
        abort = worker_pb2.AbortRequest(request_id=request.request_id, reason=reason)
        await asyncio.gather(*(self._abort_on(self._instances[i], abort) for i in instance_ids))

    async def _abort_on(self, instance: Instance, abort: worker_pb2.AbortRequest) -> None:
        try:
            await instance.stub.Abort(abort, timeout=self.config.rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            logger.warning("Abort(%s) on %s failed: %s", abort.request_id, instance, rpc_reason(e))

    # -- token streams -------------------------------------------------------------------

    def _on_delta(self, delta: worker_pb2.TokenDelta) -> None:
        request = self._in_flight.get(delta.request_id)
        if request is not None:  # else it ended here already (aborted, failed)
            request.stream.push(delta)

    def _on_stream_broken(self, instance: Instance, reason: str) -> None:
        for request in self._in_flight.values():
            if request.route.decode_id == instance.instance_id:
                request.stream.fail(
                    f"lost the token stream of {instance} ({reason}); the request was "
                    "aborted, retry it"
                )

    async def _instance_status(
        self, instance: Instance, request: worker_pb2.StatusRequest
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "address": instance.address,
            "instance_id": instance.instance_id,
            "role": instance.role.value,
            "healthy": instance.healthy,
        }
        try:
            status = await instance.stub.Status(request, timeout=self.config.rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            return {**entry, "reachable": False, "error": rpc_reason(e)}
        return {**message_to_dict(status), **entry, "reachable": True}

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
