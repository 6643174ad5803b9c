"""The workers as the router sees them, and the token stream kept open to each.

A decode or colocated instance streams the new tokens of every request this router
sent it over one long-lived Subscribe stream. Its Subscription keeps that stream open:

    connecting ──(stream open)──▶ open ──(error, or the worker ends it)──▶ broken
         ▲                                                                  │
         └──────────────────────── after a backoff ◀───────────────────────┘

Tokens a worker sends while no stream is open are lost, so the router fails the
instance's requests when its stream breaks (`on_broken`), and routes new ones
elsewhere until it is open again. The worker must send its initial metadata once
the subscriber is registered: that is how the router knows the stream is open.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from proto.tandem.internal.v1 import worker_pb2, worker_pb2_grpc
from router.errors import RouterStartError
from router.policy import Role

logger = logging.getLogger(__name__)


@dataclass
class Instance:
    address: str
    info: worker_pb2.InstanceInfo
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    stream_open: asyncio.Event = field(default_factory=asyncio.Event)
    draining: bool = False  # takes no new requests; its requests are migrated away
    expired: bool = False  # missed its heartbeats (router.membership): out of routing
    # A call found it gone (UNAVAILABLE): out of routing until it answers a Status poll.
    unreachable: bool = False

    # Read for every candidate of every request's route: made once (info never changes).
    @functools.cached_property
    def instance_id(self) -> str:
        return self.info.instance_id or self.address

    @functools.cached_property
    def role(self) -> Role:
        return Role(self.info.role)

    @property
    def streams_tokens(self) -> bool:
        return self.role in (Role.DECODE, Role.COLOCATED)

    @property
    def healthy(self) -> bool:
        return (
            (self.stream_open.is_set() or not self.streams_tokens)
            and not self.expired
            and not self.unreachable
        )

    def peer(self) -> worker_pb2.Peer:
        return worker_pb2.Peer(instance_id=self.instance_id, address=self.address)

    def __str__(self) -> str:
        return f"{self.role.value} instance {self.instance_id!r} at {self.address}"


async def connect(address: str, timeout_s: float, options: Sequence[tuple[str, int]]) -> Instance:
    """Open a channel to the worker at `address` and ask for its Info, waiting up to
    `timeout_s` for it to come up."""
    channel = grpc.aio.insecure_channel(address, options=list(options))
    stub = worker_pb2_grpc.WorkerStub(channel)
    try:
        info = await stub.Info(worker_pb2.InfoRequest(), timeout=timeout_s, wait_for_ready=True)
    except grpc.aio.AioRpcError as e:
        await channel.close()
        raise RouterStartError(
            f"could not get Info from the worker at {address} within {timeout_s:g} s "
            f"({rpc_reason(e)}); is it running, and is the address right?"
        ) from e
    if info.role not in {r.value for r in Role}:
        await channel.close()
        raise RouterStartError(f"the worker at {address} has an unknown role {info.role!r}")
    return Instance(address, info, channel, stub)


async def connect_all(
    addresses: Sequence[str], timeout_s: float, max_message_bytes: int
) -> list[Instance]:
    """connect() to every address at once. Raises RouterStartError if one cannot be
    reached, two report the same instance id, or they serve different models."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    connected = await asyncio.gather(
        *(connect(a, timeout_s, options) for a in addresses), return_exceptions=True
    )
    instances = [r for r in connected if isinstance(r, Instance)]
    errors = [r for r in connected if isinstance(r, BaseException)]
    if errors:
        await asyncio.gather(*(i.channel.close() for i in instances))
        raise errors[0]
    if len({i.instance_id for i in instances}) != len(instances):
        raise RouterStartError("two workers reported the same instance_id")
    models = {i.info.model_id for i in instances}
    if len(models) > 1:
        raise RouterStartError(f"the workers serve different models: {sorted(models)}")
    return instances


async def wait_streams_open(streaming: Sequence[Instance], timeout_s: float) -> None:
    """Until every instance's token stream is open; RouterStartError after `timeout_s`."""
    opened = asyncio.gather(*(i.stream_open.wait() for i in streaming))
    try:
        await asyncio.wait_for(opened, timeout_s)
    except asyncio.TimeoutError as e:
        closed = ", ".join(str(i) for i in streaming if not i.stream_open.is_set())
        raise RouterStartError(
            f"the token stream (Subscribe) of {closed} did not open within "
            f"{timeout_s:g} s; check the worker's log (its Subscribe must send initial "
            "metadata once it has registered the router)"
        ) from e


class Subscription:
    def __init__(
        self,
        instance: Instance,
        router_id: str,
        on_delta: Callable[[Instance, worker_pb2.TokenDelta], None],
        on_broken: Callable[[Instance, str], None],
        backoff_s: tuple[float, float],
    ) -> None:
        self._instance = instance
        self._router_id = router_id
        self._on_delta = on_delta
        self._on_broken = on_broken
        self._min_delay_s, self._max_delay_s = backoff_s
        self._delay_s = self._min_delay_s

    async def run(self) -> None:
        """Keep the stream open until cancelled."""
        while True:
            try:
                await self._stream_once()
                reason = "the worker ended the stream"
            except grpc.aio.AioRpcError as e:
                reason = rpc_reason(e)
            self._instance.stream_open.clear()
            self._on_broken(self._instance, reason)
            logger.warning(
                "token stream of %s broke (%s); reconnecting in %.2g s",
                self._instance,
                reason,
                self._delay_s,
            )
            await asyncio.sleep(self._delay_s)
            self._delay_s = min(2 * self._delay_s, self._max_delay_s)

    async def _stream_once(self) -> None:
        request = worker_pb2.SubscribeRequest(router_id=self._router_id)
        call = self._instance.stub.Subscribe(request)
        try:
            await call.wait_for_connection()
            self._instance.stream_open.set()
            self._delay_s = self._min_delay_s
            async for batch in call:
                for delta in batch.deltas:
                    self._on_delta(self._instance, delta)
        finally:
            call.cancel()


def rpc_reason(error: grpc.aio.AioRpcError) -> str:
    return f"{error.code().name}: {error.details()}"
