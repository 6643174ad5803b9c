"""The handoff sender links again, once, to a decode instance that no longer knows its
link (the instance restarted since the link was made). Fakes stand in for D and the
links; test_multinode kills and restarts a real decode worker."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import grpc

from prefill_worker.handoff import Deadlines, Handoff, HandoffSender
from proto.tandem.internal.v1 import worker_pb2 as pb


class RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@dataclass
class Link:
    link_id: str


@dataclass
class Links:
    dropped: list[str] = field(default_factory=list)

    def drop(self, link: Link) -> None:
        self.dropped.append(link.link_id)


class Decode:
    """D's Reserve: knows the links in `known`."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.reserved_with: list[str] = []

    def Reserve(self, request: pb.ReserveRequest, timeout: float) -> pb.ReserveReply:
        if request.link_id not in self.known:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"no link {request.link_id} here")
        self.reserved_with.append(request.link_id)
        return pb.ReserveReply(num_blocks=1)


def reserve(decode: Decode) -> tuple[Handoff, Links, list[tuple[str, str]], list[str]]:
    """Queues one reservation over link "old"; new links are "new-1", "new-2", ..."""
    links = Links()
    failures: list[tuple[str, str]] = []
    made: list[str] = []
    done = threading.Event()

    def connect(peer: pb.Peer) -> Link:
        made.append(f"new-{len(made) + 1}")
        return Link(made[-1])

    def failed(handoff: Handoff, code: str, message: str) -> None:
        failures.append((code, message))
        done.set()

    sender = HandoffSender(links, Deadlines(), lambda *_: None, failed, connect)  # type: ignore[arg-type]
    peer = pb.Peer(instance_id="decode-0", address="d:1")
    reservation = pb.ReserveRequest(request_id="r", link_id="old")
    handoff = Handoff("r", peer, decode, Link("old"), reservation)  # type: ignore[arg-type]
    sender.queue_reserve(handoff)
    sender.queue_commit(handoff, [], 0)  # behind the reservation: Commit answers done
    decode.Commit = lambda *_, **__: done.set()  # type: ignore[attr-defined]
    assert done.wait(10)
    sender.stop()
    return handoff, links, failures, made


def test_a_restarted_decode_instance_gets_a_new_link_and_the_reservation_goes_through():
    decode = Decode(known={"new-1"})
    handoff, links, failures, made = reserve(decode)
    assert failures == []
    assert links.dropped == ["old"] and made == ["new-1"]
    assert decode.reserved_with == ["new-1"] and handoff.reserved
    assert handoff.link.link_id == "new-1"  # the handoff's blocks go over the new link


def test_it_links_again_only_once():
    decode = Decode(known=set())
    handoff, links, failures, made = reserve(decode)
    assert links.dropped == ["old", "new-1"]  # the next request links afresh
    assert made == ["new-1"] and not handoff.reserved
    ((code, message),) = failures
    assert code == "FAILED_PRECONDITION" and "no link new-1 here" in message
