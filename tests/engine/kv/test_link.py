"""KV links: real gloo groups over loopback, made through a real TCPStore rendezvous."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.kv.link import LinkError, LinkManager, connect_store, start_store


@pytest.fixture
def managers():
    store, address = start_store()
    a = LinkManager("A", connect_store(address), connect_timeout=3, op_timeout=5)
    b = LinkManager("B", connect_store(address), connect_timeout=3, op_timeout=5)
    c = LinkManager("C", connect_store(address), connect_timeout=3, op_timeout=5)
    yield a, b, c
    del store


def link(a: LinkManager, b: LinkManager):
    forward = a.connect(b.instance_id, lambda link_id, t: b.accept(link_id, a.instance_id, t))
    return forward, b.get(forward.link_id)


def transfer(sender, receiver, tensor: torch.Tensor, timeout: float = 5) -> torch.Tensor:
    out = torch.empty_like(tensor)
    tag = sender.next_tag()
    receiving = threading.Thread(target=receiver.recv, args=(out, tag, timeout))
    receiving.start()
    sender.send(tensor, tag, timeout)
    receiving.join()
    return out


def test_bytes_arrive_intact_in_both_directions(managers):
    a, b, _ = managers
    ab, ba = link(a, b)
    kv = torch.randn(30, 4, 2, 16, 3, 64, dtype=torch.bfloat16)
    assert torch.equal(transfer(ab, ba, kv), kv)
    assert torch.equal(transfer(ba, ab, kv * 2), kv * 2)  # nothing assumes a direction
    assert ab.stats.bytes_sent == ba.stats.bytes_received == kv.numel() * 2
    assert a.connect("B", lambda *_: pytest.fail("the live link is reused")) is ab


def test_a_stalled_transfer_times_out_and_breaks_only_its_link(managers):
    a, b, c = managers
    _, ba = link(a, b)
    ac, ca = link(a, c)
    start = time.monotonic()
    with pytest.raises(LinkError, match="recv"):
        ba.recv(torch.empty(8), tag=99, timeout=1.0)  # nobody sends
    assert time.monotonic() - start < 4 and ba.broken
    with pytest.raises(LinkError, match="broken"):
        ba.recv(torch.empty(8), tag=100, timeout=1.0)
    x = torch.arange(10.0)
    assert torch.equal(transfer(ac, ca, x), x)  # the other link is untouched


def test_a_peer_that_never_joins_fails_within_the_deadline(managers):
    a, _, _ = managers

    def refuse(link_id: str, timeout: float) -> None:
        raise RuntimeError("no such instance")

    start = time.monotonic()
    with pytest.raises(LinkError, match="no such instance"):
        a.connect("ghost", refuse)
    assert time.monotonic() - start < 6
    assert a.links() == []
