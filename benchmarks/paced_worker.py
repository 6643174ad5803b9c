"""Workers without a model, for measuring the router alone.

One process serves a prefill and a decode instance (tandem's internal Worker gRPC
service, as the real workers serve it) that answer at a fixed pace instead of running
a model:

    Prefill   first token `--first-token-ms` after the call, then the handoff event;
              the request continues on the decode instance
    decode    every `--step-ms`, one token for each running request, all of them in
              one StepBatch per router (as a real engine step does), until max_tokens

They send the real model's tokenizer in Info, so the router tokenizes real text. Each
token's send time (CLOCK_MONOTONIC, shared by every process on the machine: the moment
its message is handed to gRPC, after any wait in this process's own queue) is kept, and
written as JSON to `--times-file` on SIGTERM: the benchmark subtracts it from the
time the client received the token to get the latency the router adds.

    python paced_worker.py --prefill-port 7101 --decode-port 7102 --times-file t.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from engine.models.source import resolve_model
from engine.tokenizer import load_tokenizer
from proto.tandem.internal.v1 import worker_pb2 as pb
from proto.tandem.internal.v1 import worker_pb2_grpc

NUM_BLOCKS = 1 << 20
Outgoing = tuple[list[pb.TokenDelta], list[list[float]]]  # a step's deltas, their send times
# Tokens the workers emit, in turn: common English words of the real vocabulary.
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "for",
    "on",
    "with",
    "as",
    "was",
    "at",
    "by",
    "from",
    "this",
    "be",
    "are",
]


@dataclass
class _Running:
    router_id: str
    max_tokens: int
    next_index: int
    send_times: list[float] = field(default_factory=list)


class PacedWorkers:
    """The prefill and the decode instance of one process, sharing their requests."""

    def __init__(self, first_token_s: float, step_s: float) -> None:
        tokenizer = load_tokenizer(resolve_model(None))
        self._info = {
            "model_id": "paced@0",
            "max_model_len": 4096,
            "vocab_size": len(tokenizer),
            "eos_token_ids": [tokenizer.eos_token_id],
            "tokenizer_json": tokenizer.backend_tokenizer.to_str().encode(),
            "tokenizer_config_json": json.dumps(
                {
                    "chat_template": tokenizer.chat_template,
                    "bos_token": tokenizer.bos_token,
                    "eos_token": tokenizer.eos_token,
                }
            ),
        }
        self._tokens = [
            (ids[0], word)
            for word in WORDS
            if len(ids := tokenizer.encode(" " + word, add_special_tokens=False)) == 1
        ]
        self.first_token_s = first_token_s
        self.step_s = step_s
        self.running: dict[str, _Running] = {}
        self.finished: dict[str, list[float]] = {}  # request id -> send time of each token
        # Per router: each step's batch, with the send-time lists of its requests.
        self.subscribers: dict[str, asyncio.Queue[Outgoing]] = {}
        self.prefills = 0

    def info(self, instance_id: str, role: str) -> pb.InstanceInfo:
        return pb.InstanceInfo(
            instance_id=instance_id, role=role, num_blocks=NUM_BLOCKS, **self._info
        )

    def delta(self, request_id: str, request: _Running) -> pb.TokenDelta:
        index = request.next_index
        token_id, text = self._tokens[index % len(self._tokens)]
        finished = index + 1 >= request.max_tokens
        request.next_index += 1
        return pb.TokenDelta(
            request_id=request_id,
            index=index,
            token_ids=[token_id],
            text=" " + text,
            finished=finished,
            finish_reason="length" if finished else "",
        )

    def finish(self, request_id: str) -> None:
        request = self.running.pop(request_id, None)
        if request is not None:
            self.finished[request_id] = request.send_times

    async def step_loop(self) -> None:
        """One step every step_s (on a fixed grid, so slow steps do not drift)."""
        loop = asyncio.get_running_loop()
        next_step = loop.time()
        while True:
            next_step += self.step_s
            await asyncio.sleep(max(0.0, next_step - loop.time()))
            batches: dict[str, Outgoing] = {}
            for request_id, request in list(self.running.items()):
                if request.next_index == 0:
                    continue  # its first token is the prefill's to send
                delta = self.delta(request_id, request)
                deltas, senders = batches.setdefault(request.router_id, ([], []))
                deltas.append(delta)
                senders.append(request.send_times)
                if delta.finished:
                    self.finish(request_id)
            for router_id, (deltas, senders) in batches.items():
                queue = self.subscribers.get(router_id)
                if queue is not None:
                    queue.put_nowait((deltas, senders))


class _Servicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, workers: PacedWorkers, instance_id: str, role: str) -> None:
        self.workers = workers
        self.instance_id = instance_id
        self.role = role

    async def Info(self, request, context):
        return self.workers.info(self.instance_id, self.role)

    async def Status(self, request, context):
        running = len(self.workers.running) if self.role == "decode" else 0
        return pb.InstanceStatus(
            instance_id=self.instance_id,
            role=self.role,
            num_blocks=NUM_BLOCKS,
            num_free_blocks=NUM_BLOCKS - running,
            num_running=running,
            max_num_seqs=1 << 16,
            max_num_batched_tokens=1 << 16,
        )

    async def Subscribe(self, request, context):
        queue: asyncio.Queue[Outgoing] = asyncio.Queue()
        self.workers.subscribers[request.router_id] = queue
        await context.send_initial_metadata(())
        try:
            while True:
                deltas, senders = await queue.get()
                now = time.monotonic()
                for send_times in senders:
                    send_times.append(now)
                yield pb.StepBatch(deltas=deltas)
        finally:
            self.workers.subscribers.pop(request.router_id, None)

    async def Prefill(self, request, context):
        workers = self.workers
        workers.prefills += 1
        await asyncio.sleep(workers.first_token_s)
        max_tokens = max(1, request.params.max_tokens)
        running = _Running(request.router_id, max_tokens, 0)
        workers.running[request.request_id] = running
        first = workers.delta(request.request_id, running)
        running.send_times.append(time.monotonic())
        if first.finished:
            workers.finish(request.request_id)
        yield pb.PrefillEvent(first_token=first)
        yield pb.PrefillEvent(
            handoff=pb.HandoffDone(decode_instance_id=request.decode.instance_id, kv_bytes=0)
        )

    async def Abort(self, request, context):
        found = request.request_id in self.workers.running
        self.workers.finish(request.request_id)
        return pb.AbortReply(found=found)


async def _serve(args: argparse.Namespace) -> None:
    workers = PacedWorkers(args.first_token_ms / 1000, args.step_ms / 1000)
    servers = []
    for role, port in (("prefill", args.prefill_port), ("decode", args.decode_port)):
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20)])
        worker_pb2_grpc.add_WorkerServicer_to_server(_Servicer(workers, f"{role}-0", role), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        servers.append(server)
    stepping = asyncio.ensure_future(workers.step_loop())
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    stepping.cancel()
    for server in servers:
        await server.stop(None)
    if args.times_file:
        times = {**workers.finished, **{k: r.send_times for k, r in workers.running.items()}}
        Path(args.times_file).write_text(json.dumps({"prefills": workers.prefills, "sent": times}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill-port", type=int, required=True)
    parser.add_argument("--decode-port", type=int, required=True)
    parser.add_argument("--first-token-ms", type=float, default=5.0)
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--times-file", default="")
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
