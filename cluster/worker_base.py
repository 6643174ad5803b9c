"""What every worker serves the same way: Info, Status, the gRPC server around it.

Workers (prefill, decode, colocated) subclass WorkerServicer. The engine is reached
only through `describe()` and `stats()` dicts and an engine loop's `call`, so this
module needs no model code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

import grpc

from engine.threads import run_torch_single_threaded
from proto.convert import params_to_dict, token_logprobs
from proto.tandem.internal.v1 import worker_pb2 as pb
from proto.tandem.internal.v1 import worker_pb2_grpc

logger = logging.getLogger(__name__)

T = TypeVar("T")

# KV chunks and tokenizer files exceed gRPC's 4 MB default.
MAX_MESSAGE_BYTES = 256 << 20
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def layout_message(layout: dict[str, Any]) -> pb.KVLayout:
    return pb.KVLayout(**{k: layout[k] for k in pb.KVLayout.DESCRIPTOR.fields_by_name})


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Subclasses set `engine` (an LLMEngine), `loop` (its EngineLoop) and `links` (a
    LinkManager), and report their own handoff counters from `counters()`."""

    role = "worker"
    engine: Any
    loop: Any
    links: Any

    def __init__(self, instance_id: str, address: str = "") -> None:
        self.instance_id = instance_id
        self.address = address
        self._stubs: dict[str, worker_pb2_grpc.WorkerStub] = {}
        self._stubs_lock = threading.Lock()

    def stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        """A stub for the peer worker at `address`, one channel per peer."""
        with self._stubs_lock:
            stub = self._stubs.get(address)
            if stub is None:
                stub = self._stubs[address] = worker_pb2_grpc.WorkerStub(channel(address))
            return stub

    def connect_link(self, peer: pb.Peer) -> Any:
        """The KV link to `peer` (a KVLink), made first if need be: LinkError if not."""
        stub = self.stub(peer.address)

        def open_remote(link_id: str, timeout: float) -> None:
            request = pb.OpenLinkRequest(
                link_id=link_id, initiator=self.peer, timeout_seconds=timeout
            )
            stub.OpenLink(request, timeout=timeout + 5)

        return self.links.connect(peer.instance_id, open_remote)

    def counters(self) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return dict(self.loop.call(self.engine.describe))

    def stats(self, check_invariants: bool) -> dict[str, Any]:
        """The engine's stats, this worker's counters, its links and recent step samples:
        the fields of InstanceStatus, links and step_samples as lists of dicts."""
        stats: dict[str, Any] = self.loop.call(self.engine.stats, check_invariants)
        stats.update(
            self.counters(),
            steps=self.loop.num_steps,
            links=link_stats(self.links),
            step_samples=[dataclasses.asdict(s) for s in self.loop.step_samples()],
        )
        return stats

    @property
    def peer(self) -> pb.Peer:
        return pb.Peer(instance_id=self.instance_id, address=self.address)

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InstanceInfo:
        info = self.describe()
        return pb.InstanceInfo(
            instance_id=self.instance_id,
            role=self.role,
            model_id=info["model_id"],
            layout=layout_message(info["layout"]),
            max_model_len=info["max_model_len"],
            vocab_size=info["vocab_size"],
            eos_token_ids=sorted(info["eos_token_ids"]),
            tokenizer_json=info["tokenizer_json"].encode(),
            tokenizer_config_json=json.dumps(info["tokenizer_config"]),
            num_blocks=info["num_blocks"],
            tensor_parallel_size=info["tensor_parallel_size"],
        )

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.InstanceStatus:
        stats = self.stats(request.check_invariants)
        links = [pb.LinkStats(**link) for link in stats.pop("links", [])]
        samples = [pb.StepSample(**sample) for sample in stats.pop("step_samples", [])]
        return pb.InstanceStatus(
            instance_id=self.instance_id,
            role=self.role,
            links=links,
            step_samples=samples,
            **stats,
        )


def send_blocks(
    stub: worker_pb2_grpc.WorkerStub,
    link: Any,
    request_id: str,
    start: int,
    data: Any,
    crc: int,
    num_tokens: int,
    first_layer: int,
    timeout: float,
) -> int:
    """Blocks [start, start + data.shape[1]) of a request's KV to the receiver: the header
    by ReceiveBlocks, the bytes over the KV link. Returns the bytes sent once the receiver
    has written them; LinkError or grpc.RpcError if not."""
    tag = link.next_tag()
    header = pb.BlocksHeader(
        request_id=request_id,
        link_id=link.link_id,
        tag=tag,
        start_block=start,
        num_blocks=data.shape[1],
        num_tokens=num_tokens,
        checksum=crc,
        shape=list(data.shape),
        dtype=str(data.dtype).removeprefix("torch."),
        layer_start=first_layer,
    )
    ack = stub.ReceiveBlocks.future(header, timeout=timeout)
    try:
        link.send(data, tag, timeout)
    except Exception:
        ack.cancel()
        raise
    ack.result()
    return int(data.numel() * data.element_size())


def start_server(servicer: WorkerServicer, host: str, port: int, max_workers: int = 64) -> int:
    """Serves the worker on host:port (0 picks a free port); returns the port. Handlers
    run torch on their own thread alone (engine/threads.py)."""
    handlers = futures.ThreadPoolExecutor(max_workers, initializer=run_torch_single_threaded)
    server = grpc.server(handlers, options=GRPC_OPTIONS)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not listen on {host}:{port}")
    server.start()
    servicer._server = server  # kept alive with the servicer
    servicer.address = f"{host}:{bound}"
    return bound


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=GRPC_OPTIONS)


def link_stats(links: Any) -> list[dict[str, Any]]:
    """Per-link counters of a LinkManager, for Status."""
    return [
        {
            "link_id": link.link_id,
            "peer_instance_id": link.peer_instance_id,
            "bytes_sent": link.stats.bytes_sent,
            "bytes_received": link.stats.bytes_received,
            "transfers": link.stats.transfers,
            "broken": link.broken,
        }
        for link in links.links()
    ]


def delta_message(output: Any) -> pb.TokenDelta:
    """A TokenDelta from an engine RequestOutput: this step's tokens, text and logprobs."""
    num_new = len(output.new_token_ids)
    logprobs = output.logprobs[-num_new:] if output.logprobs and num_new else []
    return pb.TokenDelta(
        request_id=output.request_id,
        index=len(output.token_ids) - num_new,
        token_ids=output.new_token_ids,
        text=output.new_text,
        finished=output.finished,
        finish_reason=output.finish_reason or "",
        stop_reason="" if output.stop_reason is None else str(output.stop_reason),
        logprobs=token_logprobs(logprobs),
        num_prompt_tokens=len(output.prompt_token_ids),
        num_cached_tokens=output.num_cached_tokens,
    )


def sampling_params(params_cls: Callable[..., T], message: pb.SamplingParams, context: Any) -> T:
    """params_cls(**fields of message), or the RPC fails with INVALID_ARGUMENT saying why."""
    try:
        return params_cls(**params_to_dict(message))
    except (ValueError, TypeError) as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        raise  # unreachable: abort raises
