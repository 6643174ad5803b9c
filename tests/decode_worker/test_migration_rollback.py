"""A migration that fails at each of its points rolls back: the source keeps the request
(resumed if it was paused) and finishes it with the tokens it would have produced, the
destination frees what it reserved, and every block comes back on both sides.

The source is a real DecodeService with its engine loop running; the destination is a
second real engine behind a transport that the test breaks at a chosen point (the real
gRPC and KV-link path is in tests/integration/test_migration.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest

from decode_worker.migration import Migration, MigrationLimits
from decode_worker.service import DecodeService
from engine.engine import LLMEngine
from engine.kv.kv_cache import KVBlockMeta
from engine.kv.link import LinkError, LinkManager, start_store
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from proto.convert import params_to_dict
from proto.tandem.internal.v1 import worker_pb2 as pb

PARAMS = SamplingParams(max_tokens=48, temperature=0.8, seed=3, ignore_eos=True)
DESTINATION = pb.Peer(instance_id="dest", address="dest:1")


class RpcFailure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "injected") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Destination:
    """A destination engine reached through a transport broken at `fail_at`."""

    def __init__(self, engine: LLMEngine, fail_at: str = "", delay_s: float = 0.0) -> None:
        self.engine = engine
        self.fail_at = fail_at
        self.delay_s = delay_s
        self.aborted: list[str] = []
        self.num_reserves = 0
        self.link_id = "link-test"
        self.peer_instance_id = "destination"
        self._data: Any = None
        self.tag = 0

    # the stub
    def Reserve(self, request: pb.ReserveRequest, timeout: float) -> pb.ReserveReply:
        self.num_reserves += 1
        if self.fail_at == "stale_link":  # D restarted since the link was made
            raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, "no link link-test here")
        if self.fail_at == "reserve_full" or (self.fail_at == "grow" and self.num_reserves > 1):
            raise RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, "no room: injected")
        if self.num_reserves > 1:
            num = self.engine.grow_reservation(request.request_id, request.num_kv_tokens)
        else:
            layout = self.engine.layout()
            layout = KVBlockMeta(**{**layout.to_dict(), "num_tokens": request.num_kv_tokens})
            num = self.engine.reserve(
                request.request_id,
                list(request.prompt_token_ids),
                SamplingParams(**params_to_dict(request.params)),
                request.num_kv_tokens,
                layout,
            )
        return pb.ReserveReply(num_blocks=num)

    @property
    def ReceiveBlocks(self) -> Destination:
        return self

    def future(self, header: pb.BlocksHeader, timeout: float) -> Any:
        destination = self

        class Ack:
            def result(self) -> None:
                time.sleep(destination.delay_s)
                if destination.fail_at == "blocks":
                    raise RpcFailure(grpc.StatusCode.UNAVAILABLE)
                if destination.delay_s > timeout:
                    raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED)
                destination.engine.write_kv(
                    header.request_id, header.start_block, destination._data, header.checksum
                )

            def cancel(self) -> None:
                pass

        return Ack()

    def Commit(self, request: pb.CommitRequest, timeout: float) -> pb.CommitReply:
        if self.fail_at == "commit":
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE)
        self.engine.commit(
            request.request_id, list(request.output_token_ids), request.num_kv_tokens
        )
        if self.fail_at == "commit_lost":  # applied, but the answer never came back
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED)
        return pb.CommitReply()

    def Abort(self, request: pb.AbortRequest, timeout: float) -> pb.AbortReply:
        self.aborted.append(request.request_id)
        found = request.request_id in self.engine.requests
        self.engine.abort_request(request.request_id)
        self.engine.step()  # emits the abort, frees the blocks
        return pb.AbortReply(found=found)

    # the KV link
    def next_tag(self) -> int:
        self.tag += 1
        return self.tag

    def send(self, data: Any, tag: int, timeout: float) -> None:
        self._data = data


class Links(LinkManager):
    """The source's real LinkManager, recording the links it drops."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.dropped: list[str] = []

    def drop(self, link: Any) -> None:
        self.dropped.append(link.link_id)
        super().drop(link)


class Source(DecodeService):
    """A real decode service whose peer is the test's Destination; it records outputs."""

    def __init__(self, engine: LLMEngine, links: LinkManager) -> None:
        super().__init__(engine, "source", links)
        self.destination: Destination | None = None
        self.outputs: dict[str, list[int]] = {}
        self.finished: dict[str, str | None] = {}
        self.done = threading.Condition()

    def stub(self, address: str) -> Any:
        return self.destination

    def connect_link(self, peer: pb.Peer) -> Any:
        assert self.destination is not None
        if self.destination.fail_at == "link":
            raise LinkError("injected: the peer did not join the rendezvous")
        return self.destination

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        super()._on_outputs(outputs)
        with self.done:
            for out in outputs:
                self.outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finished:
                    self.finished[out.request_id] = out.finish_reason
            self.done.notify_all()


@pytest.fixture(scope="module")
def engines(engine_pair):
    return engine_pair


@pytest.fixture(scope="module")
def expected(engines, prompts) -> list[int]:
    source_engine, _ = engines
    rid = source_engine.add_request(prompts[9], PARAMS)
    tokens: list[int] = []
    while True:
        for out in source_engine.step():
            tokens += out.new_token_ids
            if out.finished and out.request_id == rid:
                return tokens


@pytest.fixture
def source(engines):
    store, _ = start_store()
    service = Source(engines[0], Links("source", store))
    service.start()
    yield service
    service.stop()


def start_request(source: Source, prompt: list[int], num_tokens: int) -> str:
    rid = f"r-{time.monotonic_ns()}"
    source._routes[rid] = "router"
    source.loop.call(source.engine.add_request, prompt, PARAMS, request_id=rid)
    with source.done:
        source.done.wait_for(lambda: len(source.outputs.get(rid, [])) >= num_tokens, 60)
    return rid


def wait_finished(source: Source, rid: str) -> str | None:
    with source.done:
        assert source.done.wait_for(lambda: rid in source.finished, 120)
    return source.finished[rid]


@pytest.mark.parametrize(
    ("fail_at", "reason", "paused"),
    [
        ("link", "link_failed", False),
        ("stale_link", "link_failed", False),
        ("reserve_full", "destination_full", False),
        ("blocks", "destination_failed", False),
        ("grow", "destination_full", True),
        ("commit", "destination_failed", True),
        ("commit_lost", "deadline", True),
    ],
)
def test_a_failure_at_each_point_leaves_the_request_running_at_the_source(
    source, engines, prompts, expected, fail_at, reason, paused
):
    _, dest_engine = engines
    # A copy that takes a few steps, so that the request outgrows a reservation
    # without headroom ("grow").
    source.destination = Destination(dest_engine, fail_at, delay_s=0.2)
    source_free = source.loop.call(lambda: source.engine.kv.pool.num_free_blocks)
    dest_free = dest_engine.kv.pool.num_free_blocks
    rid = start_request(source, prompts[9], 5)
    limits = MigrationLimits(headroom_tokens=0 if fail_at == "grow" else 64)
    reply = Migration(rid, "router", DESTINATION, source, limits).run()
    assert not reply.committed
    assert reply.abort_reason == reason, reply.detail
    assert wait_finished(source, rid) == "length"
    assert source.outputs[rid] == expected  # resumed where it paused: nothing lost
    if fail_at != "link":
        assert source.destination.aborted == [rid]
    assert rid not in dest_engine.requests
    assert dest_engine.kv.pool.num_free_blocks == dest_free
    dest_engine.check_invariants()
    assert source.loop.call(lambda: source.engine.kv.pool.num_free_blocks) == source_free
    source.loop.call(source.engine.check_invariants)
    if paused:
        assert reply.num_kv_tokens > len(prompts[9])
    if fail_at == "stale_link":
        assert source.links.dropped == ["link-test"]  # the next migration links afresh


def test_a_committed_migration_hands_over_and_the_destination_finishes_it(
    source, engines, prompts, expected
):
    _, dest_engine = engines
    source.destination = Destination(dest_engine)
    rid = start_request(source, prompts[9], 5)
    reply = Migration(rid, "router", DESTINATION, source, MigrationLimits()).run()
    assert reply.committed, reply.detail
    assert reply.stages >= 2 and reply.downtime_seconds < reply.total_seconds
    moved = list(source.outputs[rid])
    tokens = []
    while rid in dest_engine.requests:
        for out in dest_engine.step():
            tokens += out.new_token_ids
    assert moved + tokens == expected
    assert rid not in source.finished  # the source released it without an output
    assert source.loop.call(lambda: source.engine.kv.pool.num_used_blocks) == 0
    assert dest_engine.kv.pool.num_used_blocks == 0


@pytest.mark.parametrize("how", ["client_abort", "finishes", "deadline"])
def test_a_request_that_ends_or_stalls_mid_copy_aborts_the_migration(source, engines, prompts, how):
    _, dest_engine = engines
    dest_free = dest_engine.kv.pool.num_free_blocks
    delay = {"client_abort": 0.3, "finishes": 2.5, "deadline": 1.5}[how]
    source.destination = Destination(dest_engine, delay_s=delay)
    rid = start_request(source, prompts[9], 40 if how == "finishes" else 5)
    if how == "client_abort":
        threading.Timer(0.1, source.loop.call, (source._abort, rid, "client went away")).start()
    limits = MigrationLimits(stage_deadline=1.0 if how == "deadline" else 10.0)
    reply = Migration(rid, "router", DESTINATION, source, limits).run()
    assert not reply.committed
    assert reply.abort_reason == ("deadline" if how == "deadline" else "finished"), reply.detail
    expected_end = {"client_abort": "abort", "finishes": "length", "deadline": "length"}[how]
    assert wait_finished(source, rid) == expected_end
    assert source.destination.aborted == [rid]
    assert dest_engine.kv.pool.num_free_blocks == dest_free
    assert source.loop.call(lambda: source.engine.kv.pool.num_used_blocks) == 0
    source.loop.call(source.engine.check_invariants)
