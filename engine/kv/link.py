"""KV links: point-to-point torch.distributed groups between two instances, made on demand.

A link is a two-rank process group of its own (gloo for CPU tensors, NCCL for CUDA
ones), so any number of links coexist in one process and a broken one takes no
other down. Links are made through a rendezvous in the state store: the initiator
picks a link id, asks the peer to join (an RPC the caller supplies), and both
sides build the group under the store prefix `kvlink/<link id>/`.

    initiator                                    peer
    connect(peer) ─ OpenLink(link_id) RPC ─────▶ accept(link_id)
      group(rank 0) ◀──── store rendezvous ────▶ group(rank 1)
    send(tensor, tag) ────── bytes ───────────▶ recv(buffer, tag)

Nothing here knows who prefills or decodes: both ranks can send and receive.
Every operation has a deadline; a failed or late one marks the link broken, and
the manager makes a fresh link the next time that peer is needed.
"""

from __future__ import annotations

import datetime
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from engine.errors import TandemError


class LinkError(TandemError):
    """A KV link could not be made, or a transfer over it failed or timed out."""


@dataclass
class LinkStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    transfers: int = 0
    seconds: float = 0.0  # wall time inside send/recv


@dataclass
class KVLink:
    link_id: str
    peer_instance_id: str
    rank: int  # 0 for the initiator
    group: Any  # the two-rank gloo or NCCL backend
    stats: LinkStats = field(default_factory=LinkStats)
    broken: bool = False
    _tags: itertools.count = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def peer_rank(self) -> int:
        return 1 - self.rank

    def next_tag(self) -> int:
        with self._lock:
            return next(self._tags)

    def send(self, tensor: torch.Tensor, tag: int, timeout: float) -> None:
        self._run(lambda: self.group.send([tensor], self.peer_rank, tag), tensor, timeout, "send")
        self.stats.bytes_sent += tensor.numel() * tensor.element_size()

    def recv(self, tensor: torch.Tensor, tag: int, timeout: float) -> None:
        self._run(lambda: self.group.recv([tensor], self.peer_rank, tag), tensor, timeout, "recv")
        self.stats.bytes_received += tensor.numel() * tensor.element_size()

    def _run(
        self, start: Callable[[], dist.Work], tensor: torch.Tensor, timeout: float, what: str
    ) -> None:
        if self.broken:
            raise LinkError(f"link {self.link_id} to {self.peer_instance_id} is broken")
        begin = time.perf_counter()
        try:
            start().wait(datetime.timedelta(seconds=timeout))
        except Exception as exc:
            self.broken = True
            raise LinkError(
                f"{what} of {tensor.numel() * tensor.element_size()} bytes on link "
                f"{self.link_id} to {self.peer_instance_id} failed: {exc}"
            ) from exc
        self.stats.transfers += 1
        self.stats.seconds += time.perf_counter() - begin


def _make_group(
    store: dist.Store, link_id: str, rank: int, host: str, timeout: float, device: str
) -> Any:  # a gloo or NCCL backend object: send/recv/_set_default_timeout
    if device == "cuda":  # pragma: no cover - needs two GPUs
        prefix = dist.PrefixStore(f"kvlink/{link_id}/", store)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = datetime.timedelta(seconds=timeout)
        return dist.ProcessGroupNCCL(prefix, rank, 2, options)
    return gloo_group(store, f"kvlink/{link_id}/", rank, 2, host, timeout)


def gloo_group(
    store: dist.Store, prefix: str, rank: int, size: int, host: str, timeout: float | None
) -> Any:  # ProcessGroupGloo
    """A gloo group of `size` ranks meeting under `prefix` in `store`, talking over
    `host`'s interface; `timeout` None: operations wait without end unless given one."""
    options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._timeout = datetime.timedelta(days=365 if timeout is None else 0, seconds=timeout or 0)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size, options)


class LinkManager:
    """An instance's links, one live link per peer, made on demand.

    `store` is the state store's torch.distributed view (a TCPStore client), `host`
    the address peers reach this instance's gloo sockets on.
    """

    def __init__(
        self,
        instance_id: str,
        store: dist.Store,
        host: str = "127.0.0.1",
        device: str = "cpu",
        connect_timeout: float = 10.0,
        op_timeout: float = 30.0,
    ) -> None:
        self.instance_id = instance_id
        self.store = store
        self.host = host
        self.device = device
        self.connect_timeout = connect_timeout
        self.op_timeout = op_timeout
        self._links: dict[str, KVLink] = {}
        self._by_peer: dict[str, KVLink] = {}
        self._lock = threading.Lock()
        self._peer_locks: dict[str, threading.Lock] = {}
        self.num_broken = 0

    def connect(self, peer_instance_id: str, open_remote: Callable[[str, float], None]) -> KVLink:
        """The live link to a peer, made first if need be.

        `open_remote(link_id, timeout)` must make the peer call `accept(link_id, ...)`;
        it runs on a helper thread while this side joins the rendezvous.
        """
        with self._lock:
            peer_lock = self._peer_locks.setdefault(peer_instance_id, threading.Lock())
        with peer_lock:
            link = self._by_peer.get(peer_instance_id)
            if link is not None and not link.broken:
                return link
            if link is not None:
                self.drop(link)
            link_id = f"{self.instance_id}>{peer_instance_id}>{uuid.uuid4().hex[:8]}"
            failure: list[BaseException] = []

            def ask_peer() -> None:
                try:
                    open_remote(link_id, self.connect_timeout)
                except BaseException as exc:  # reported by the joining side below
                    failure.append(exc)

            asker = threading.Thread(target=ask_peer, name=f"open-{link_id}", daemon=True)
            asker.start()
            try:
                group = _make_group(
                    self.store, link_id, 0, self.host, self.connect_timeout, self.device
                )
            except Exception as exc:
                asker.join(self.connect_timeout)
                cause = failure[0] if failure else exc
                raise LinkError(
                    f"could not link to {peer_instance_id} within {self.connect_timeout:.0f} s: "
                    f"{cause}"
                ) from exc
            asker.join(self.connect_timeout)
            if failure:
                raise LinkError(f"{peer_instance_id} refused link {link_id}: {failure[0]}")
            link = KVLink(link_id, peer_instance_id, 0, group)
            link.group._set_default_timeout(datetime.timedelta(seconds=self.op_timeout))
            self._register(link)
            return link

    def accept(self, link_id: str, peer_instance_id: str, timeout: float) -> KVLink:
        """Joins a link a peer is making (rank 1); blocks until both sides are in."""
        try:
            group = _make_group(self.store, link_id, 1, self.host, timeout, self.device)
        except Exception as exc:
            raise LinkError(
                f"could not join link {link_id} from {peer_instance_id}: {exc}"
            ) from exc
        link = KVLink(link_id, peer_instance_id, 1, group)
        link.group._set_default_timeout(datetime.timedelta(seconds=self.op_timeout))
        self._register(link)
        return link

    def get(self, link_id: str) -> KVLink:
        link = self._links.get(link_id)
        if link is None:
            raise LinkError(f"no link {link_id} here")
        return link

    def drop(self, link: KVLink) -> None:
        """Forgets a link (broken, or its peer gone)."""
        with self._lock:
            if self._links.pop(link.link_id, None) is not None:
                self.num_broken += link.broken
            if self._by_peer.get(link.peer_instance_id) is link:
                del self._by_peer[link.peer_instance_id]

    def drop_broken(self) -> None:
        for link in list(self._links.values()):
            if link.broken:
                self.drop(link)

    def links(self) -> list[KVLink]:
        return list(self._links.values())

    def _register(self, link: KVLink) -> None:
        with self._lock:
            self._links[link.link_id] = link
            self._by_peer[link.peer_instance_id] = link


def start_store(host: str = "127.0.0.1", port: int = 0) -> tuple[dist.TCPStore, str]:
    """Hosts a state store for link rendezvous (the control plane's); returns it and host:port."""
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, use_libuv=True)
    return store, f"{host}:{store.port}"


def connect_store(address: str, timeout: float = 30.0) -> dist.TCPStore:
    """A client of the state store at host:port."""
    host, _, port = address.rpartition(":")
    return dist.TCPStore(
        host, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout)
    )
