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
instance that may hold it. The worker calls are in dispatch.py, the bounds on what is
admitted in admission.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Coroutine, Iterable, Sequence
from typing import Any

from proto.tandem.internal.v1 import worker_pb2
from router.admission import Admission
from router.config import RouterConfig
from router.dispatch import InFlight, abort_on, dispatch
from router.errors import NotReadyError, RouterError, RouterStartError
from router.instances import Instance, Subscription, connect_all, wait_streams_open
from router.load import LoadTracker
from router.membership import Membership
from router.metrics import RouterMetrics
from router.migration import Migrations
from router.policy import Candidate, Role, RoundRobinPolicy, Route, RouteRequest, RoutingPolicy
from router.status import HandoffLog, HandoffRecord, instances_summary, poll_loads, workers_status
from router.streams import RequestStream
from router.tokenizer import RouterTokenizer

logger = logging.getLogger(__name__)


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
        membership: Membership | None = None,
    ) -> None:
        if not worker_addresses:
            raise ValueError("the router needs at least one worker address")
        self._addresses = list(worker_addresses)
        self._policy = policy or RoundRobinPolicy()
        self.config = config or RouterConfig()
        self.handoffs = HandoffLog()
        self._instances: dict[str, Instance] = {}
        self._in_flight: dict[str, InFlight] = {}
        self._routed: dict[str, int] = {}  # instance id -> requests in flight routed to it
        self._tasks: set[asyncio.Task[Any]] = set()
        self._aborts: set[asyncio.Task[Any]] = set()  # also in _tasks
        self._tokenizer: RouterTokenizer | None = None
        self._started = False
        self._draining = False
        self._closing = False
        self._admission = Admission(
            self.config.max_in_flight, self.config.max_waiting_prompt_tokens
        )
        self.metrics = RouterMetrics(self.config.slo_classes)
        self.membership = membership or Membership()  # the instance registry, in memory
        self.metrics.add_collector(self.membership)
        self.loads = LoadTracker(max_age_s=self.config.load_max_age_s)
        self.migrations = Migrations(
            self._in_flight,
            self._instances,
            self._routed,
            self.loads,
            self.metrics.migration,
            self.config.migration_timeout_s,
        )

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Ask every worker for its Info, then open the token streams. Raises
        RouterStartError if a worker cannot be reached or they serve different models."""
        try:
            config = self.config
            instances = await connect_all(
                self._addresses, config.connect_timeout_s, config.max_message_bytes
            )
            instances = await self.membership.admit(instances)  # the refused are closed
            if not instances:
                raise RouterStartError(f"every worker was refused: {self.membership.refused}")
            self._instances.update((i.instance_id, i) for i in instances)
            first = self._instances[next(iter(self._instances))]
            self._tokenizer = RouterTokenizer.from_info(first.info)
            self._subscribe_all()
            streaming = [i for i in self._instances.values() if i.streams_tokens]
            await wait_streams_open(streaming, config.connect_timeout_s)
            self.metrics.set_model_name(self.model_id)
            self._spawn(
                poll_loads(
                    self._instances,
                    config,
                    self.loads,
                    self.metrics,
                    self._queue_sizes,
                    self.membership,
                )
            )
            if config.migration_policy != "off":
                self._spawn(self.migrations.run_policy(config))
            self._started = True
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self._closing = True
        # Let the aborts already on their way reach the workers; stop everything else.
        if self._aborts:
            await asyncio.wait(self._aborts, timeout=self.config.rpc_timeout_s)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(i.channel.close() for i in self._instances.values()))
        await self.membership.close()

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

    @property
    def waiting_prompt_tokens(self) -> int:
        """Prompt tokens of the requests in flight that have no token yet."""
        return self._admission.waiting_prompt_tokens

    @property
    def ready(self) -> bool:
        """Takes new requests: started, not draining, and some route is healthy."""
        if not self._started or self._draining:
            return False
        roles = {i.role for i in self._instances.values() if i.healthy}
        return Role.COLOCATED in roles or {Role.PREFILL, Role.DECODE} <= roles

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        """Take no new requests (NotReadyError); those in flight run to their end."""
        self._draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Until no request is in flight, or `timeout_s` has passed: False then."""
        deadline = time.monotonic() + timeout_s
        while self._in_flight:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def instances_summary(self) -> list[dict[str, Any]]:
        """Each worker as the admin API shows it."""
        return instances_summary(self._instances.values(), self._routed, self.loads)

    @staticmethod
    def new_request_id(prefix: str = "cmpl") -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: worker_pb2.SamplingParams,
        request_id: str | None = None,
    ) -> AsyncGenerator[worker_pb2.TokenDelta, None]:
        """The request's deltas in index order, ending after the finished one.

        `request_id` (made here if not given) must be unique among requests in flight;
        the front doors make it, never a client. A failure becomes a last delta with
        finish_reason "error" and `error` set. Raises (on the first step) NotReadyError
        while starting or draining, OverloadedError beyond the admission bounds, and
        NoInstanceError when no instance can take it. Close the generator
        (contextlib.aclosing) to stop early: that aborts on the workers.
        """
        self._admit(len(prompt_token_ids))
        route = self._choose_route(RouteRequest(prompt_token_ids))
        request_id = request_id or self.new_request_id()
        if request_id in self._in_flight:
            raise RouterError(f"request id {request_id!r} is already in flight")
        now = time.monotonic()
        self.loads.on_dispatch(
            route.prefill_id or route.decode_id, request_id, len(prompt_token_ids), now
        )
        if route.prefill_id is not None:
            self.loads.on_dispatch(route.decode_id, request_id, len(prompt_token_ids), now)
        generate = worker_pb2.GenerateRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            params=params,
            router_id=self.config.router_id,
        )
        request = InFlight(
            request_id, route, RequestStream(request_id), len(prompt_token_ids), generate
        )
        self._in_flight[request.request_id] = request
        for instance_id in route.instance_ids:
            self._routed[instance_id] = self._routed.get(instance_id, 0) + 1
        self._admission.admitted(request.num_prompt_tokens)
        tracked = self.metrics.request_started()
        finish_reason, num_cached = "abort", 0  # unless a last delta says otherwise
        try:
            await self._dispatch(request, generate)
            tracked.dispatched()
            while True:
                delta = await request.stream.get()
                self._answered(request)
                tracked.tokens(len(delta.token_ids))
                if delta.index == 0:
                    num_cached = delta.num_cached_tokens
                if delta.finished:
                    finish_reason = delta.finish_reason
                yield delta
                if delta.finished:
                    return
        finally:
            tracked.finished(finish_reason, request.num_prompt_tokens, num_cached)
            self._answered(request)
            self._end(request)

    def _queue_sizes(self) -> tuple[int, int]:
        """Requests in flight, and of those the ones still waiting for a first token."""
        return len(self._in_flight), sum(r.waiting for r in self._in_flight.values())

    def _admit(self, num_prompt_tokens: int) -> None:
        if not self._started:
            raise NotReadyError("the router is starting; retry in a moment")
        if self._draining:
            raise NotReadyError("the router is draining and takes no new requests")
        self._admission.check(len(self._in_flight), num_prompt_tokens)

    def _answered(self, request: InFlight) -> None:
        """Its first token came (or it ended): its prompt no longer waits."""
        if request.prompt_pending:
            request.prompt_pending = False
            self.loads.on_finish(
                request.route.prefill_id or request.route.decode_id, request.request_id
            )
        if request.waiting:
            request.waiting = False
            self._admission.answered(request.num_prompt_tokens)

    def abort(self, request_id: str) -> bool:
        """Stop a request in flight (by the id its deltas carry): its stream ends with
        finish_reason "abort" and the workers drop it. False if it is not in flight."""
        request = self._in_flight.get(request_id)
        if request is None:
            return False
        request.stream.abort()
        return True

    async def status(self, check_invariants: bool = False) -> dict[str, Any]:
        """The workers' Status, the handoff totals and the requests in flight, as JSON.
        With check_invariants, each worker checks its KV cache and says what is wrong in
        `invariants_error`."""
        instances = await workers_status(
            self._instances.values(), check_invariants, self.config.rpc_timeout_s
        )
        return {
            "router_id": self.config.router_id,
            "model": self.model_id,
            "num_in_flight": self.num_in_flight,
            "instances": instances,
            "handoffs": self.handoffs.summary(),
            "store": self.membership.summary(),
        }

    # -- starting ----------------------------------------------------------------------

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

    # -- one request -------------------------------------------------------------------

    def _choose_route(self, request: RouteRequest, avoid: str | None = None) -> Route:
        now = time.monotonic()
        candidates = [
            Candidate(
                i.instance_id,
                i.role,
                self._routed.get(i.instance_id, 0),
                self.loads.current(i.instance_id, now),
                self.loads.step_model(i.instance_id),
            )
            for i in self._instances.values()
            if i.healthy and not i.draining and i.instance_id != avoid
        ]
        return self._policy.choose(request, candidates)

    def _on_handoff(self, record: HandoffRecord) -> None:
        self.handoffs.add(record)
        self.metrics.kv_transfer(record.kv_bytes, record.seconds)

    def _end(self, request: InFlight) -> None:
        """Forget the request, and abort it on the workers unless a worker finished it."""
        if self._in_flight.pop(request.request_id, None) is not None:
            for instance_id in request.route.instance_ids:
                self._routed[instance_id] -= 1
        self.loads.on_finish(request.route.decode_id, request.request_id)
        if not request.stream.needs_abort:
            return  # its prefill stream ends by itself: the handoff event may still come
        if request.prefill_task is not None:
            request.prefill_task.cancel()
        holders = [*request.route.instance_ids, *filter(None, [request.migrating_to])]
        self._abort_on(holders, request.worker_id, "the client went away, or the request failed")

    def _abort_on(self, instance_ids: Iterable[str], request_id: str, reason: str) -> None:
        abort = self._spawn(
            abort_on(
                [self._instances[i] for i in instance_ids],
                request_id,
                reason,
                self.config.rpc_timeout_s,
            )
        )
        self._aborts.add(abort)
        abort.add_done_callback(self._aborts.discard)

    # -- token streams -------------------------------------------------------------------

    def _on_delta(self, instance: Instance, delta: worker_pb2.TokenDelta) -> None:
        request = self._in_flight.get(delta.request_id)
        if request is None:
            base, resumed, _ = delta.request_id.rpartition("@")
            request = self._in_flight.get(base) if resumed else None
            if request is None:
                return  # it ended here already (aborted, failed)
        if request.attempt and delta.request_id != request.worker_id:
            return  # from an attempt given up on
        prefill_id = request.route.prefill_id
        if delta.error and prefill_id is not None and request.handoff is None:
            # The decode side gave up on the KV handoff (the link broke, or the sender
            # went silent): the prefill instance is taken for gone, as its own stream
            # would say, whichever of the two the router hears first.
            message = f"{instance}: {delta.error}"
            self._on_worker_failed(request, request.attempt, prefill_id, message)
            return
        if instance.instance_id == request.route.decode_id or self.migrations.accepts(
            request, instance.instance_id, delta
        ):
            request.stream.push(delta)

    def _on_stream_broken(self, instance: Instance, reason: str) -> None:
        message = f"lost the token stream of {instance} ({reason})"
        for request in list(self._in_flight.values()):
            if request.route.decode_id == instance.instance_id:
                self._on_worker_failed(request, request.attempt, instance.instance_id, message)

    # -- recovery ------------------------------------------------------------------------

    def _on_worker_failed(
        self,
        request: InFlight,
        attempt: int,
        instance_id: str,
        message: str,
        gone: bool = True,
    ) -> None:
        """A worker of the request failed it. If the worker is `gone` (it died, or
        cannot be reached) the request is resumed on other instances, up to max_retries
        times; otherwise, or past that, its stream ends with the error. News of an
        attempt the router has already moved on from is ignored."""
        if gone:
            self._instances[instance_id].unreachable = True
        if request.stream.closed or attempt != request.attempt:
            return
        if not gone or request.attempt >= self.config.max_retries or self._closing:
            tried = f" (resumed {request.attempt} times)" if request.attempt else ""
            request.stream.fail(f"{message}{tried}; the request was aborted, retry it")
            return
        generated = list(request.stream.token_ids)
        prompt = request.generate.prompt_token_ids
        try:
            route = self._choose_route(RouteRequest([*prompt, *generated]), avoid=instance_id)
        except RouterError as e:
            request.stream.fail(f"{message}; no other instance can take the request over ({e})")
            return
        self._resume(request, route, generated, instance_id, message)

    def _resume(
        self, request: InFlight, route: Route, generated: list[int], failed_id: str, message: str
    ) -> None:
        """Moves the request to `route` now, and sends it there (a task): its prompt plus
        the tokens `generated` so far; its stream goes on from the next position."""
        role = self._instances[failed_id].role.value
        logger.warning(
            "resuming %s after %d tokens on %s: %s",
            request.request_id,
            len(generated),
            route,
            message,
        )
        self.metrics.retried(f"{role}_lost")
        if request.prefill_task is not None:
            request.prefill_task.cancel()
        leftovers = {*request.route.instance_ids, *filter(None, [request.migrating_to])}
        self._abort_on(leftovers - {failed_id}, request.worker_id, f"resumed elsewhere: {message}")
        request.attempt += 1  # from here on, news of the old attempt is stale
        self._reroute(request, route, len(generated))
        request.stream.restart()
        generate = worker_pb2.GenerateRequest()
        generate.CopyFrom(request.generate)
        generate.request_id = request.worker_id
        generate.output_token_ids.extend(generated)
        self._spawn(self._dispatch(request, generate))

    async def _dispatch(self, request: InFlight, generate: worker_pb2.GenerateRequest) -> None:
        if request.stream.closed:
            return  # a resumed request that ended before it was sent again
        await dispatch(
            request,
            self._instances,
            generate,
            self.config.rpc_timeout_s,
            self._spawn,
            self._on_handoff,
            self._on_worker_failed,
        )

    def _reroute(self, request: InFlight, route: Route, num_generated: int) -> None:
        """Moves the request's bookkeeping (routed counts, queued prompts) to `route`."""
        for instance_id in request.route.instance_ids:
            self._routed[instance_id] -= 1
            self.loads.on_finish(instance_id, request.request_id)
        for instance_id in route.instance_ids:
            self._routed[instance_id] = self._routed.get(instance_id, 0) + 1
            self.loads.on_dispatch(
                instance_id,
                request.request_id,
                request.num_prompt_tokens + num_generated,
                time.monotonic(),
            )
        request.route = route
        request.prompt_pending = True
        request.handoff = None
        request.prefill_task = None
        request.migrating_to = None
        request.moved_from.clear()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
