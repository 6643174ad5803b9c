"""The router benchmark's clients (router_bench.py): what each saw of one request.

HttpClient         one keep-alive HTTP/1.1 connection, streamed /v1/completions,
                   each token timed when this process reads it
StampedHttpClient  the same, each token timed by the kernel's receive timestamp
GrpcClient         the gRPC API's GenerateStream
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from dataclasses import dataclass, field

PROMPT = "Summarize the history of the printing press in a few sentences for a young reader."


@dataclass
class Sample:
    """What a client saw of one request."""

    request_id: str = ""
    status: int = 0
    arrivals: list[float] = field(default_factory=list)  # monotonic time of each token
    seen: list[float] = field(default_factory=list)  # StampedHttpClient: when it read each


# ---- clients ---------------------------------------------------------------------------------


def completion_request(max_tokens: int) -> bytes:
    """A streamed /v1/completions request of PROMPT, as HTTP/1.1 bytes."""
    body = json.dumps(
        {"model": "default", "prompt": PROMPT, "max_tokens": max_tokens, "stream": True}
    ).encode()
    return (
        b"POST /v1/completions HTTP/1.1\r\nHost: router\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def read_tokens(chunk: bytes, sample: Sample) -> int:
    """The tokens in one chunk of SSE events (a chunk with text is one token); the
    request's id goes to `sample` from its first event."""
    num_tokens = 0
    for event in chunk.split(b"\n\n"):
        if not event.startswith(b"data: {"):
            continue
        choice = json.loads(event[6:])
        if not sample.request_id:
            sample.request_id = choice["id"]
        num_tokens += bool(choice["choices"] and choice["choices"][0]["text"])
    return num_tokens


class HttpClient:
    """One keep-alive HTTP/1.1 connection; one streamed completion at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def complete(self, max_tokens: int) -> Sample:
        if self.writer is None or self.reader is None or self.reader.at_eof():
            # New, or closed by the server after its keep-alive timeout.
            self.close()
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(completion_request(max_tokens))
        sample = Sample()
        head = await self.reader.readuntil(b"\r\n\r\n")
        sample.status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" not in head.lower():
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await self.reader.readexactly(length)
            return sample
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return sample
            now = time.monotonic()
            sample.arrivals.extend(now for _ in range(read_tokens(data, sample)))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


SO_TIMESTAMPNS = 35  # Linux: the kernel stamps each received packet (CLOCK_REALTIME)


class StampedHttpClient:
    """HttpClient for the latency phase, timed by the kernel: a token's arrival is the
    receive timestamp (SO_TIMESTAMPNS) of the read that completed its chunk, not the
    moment this process got round to it. The client shares its core with the workers,
    and its own event loop's delays are not the router's. (A read that completes
    several chunks stamps them all with its last packet's time, which is never early.)"""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.clock_offset = time.time() - time.monotonic()  # realtime -> monotonic

    async def complete(self, max_tokens: int) -> Sample:
        loop = asyncio.get_running_loop()
        if self.sock is not None and self._closed_by_server():
            self.close()  # after its keep-alive timeout
            self.sock = None
        if self.sock is None:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.setblocking(False)
            await loop.sock_connect(self.sock, ("127.0.0.1", self.port))
        await loop.sock_sendall(self.sock, completion_request(max_tokens))
        sample = Sample()
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            data, stamp = await self._receive()
            buffer += data
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        sample.status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" not in head.lower():
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(buffer) < length:
                buffer += (await self._receive())[0]
            return sample
        while True:
            size_end = buffer.find(b"\r\n")
            size = int(buffer[:size_end], 16) if size_end >= 0 else -1
            if size < 0 or len(buffer) < size_end + 2 + size + 2:
                data, stamp = await self._receive()
                buffer += data
                continue
            chunk = buffer[size_end + 2 : size_end + 2 + size]
            buffer = buffer[size_end + 2 + size + 2 :]
            if size == 0:
                return sample
            num_tokens = read_tokens(chunk, sample)
            sample.arrivals.extend(stamp - self.clock_offset for _ in range(num_tokens))
            sample.seen.extend(time.monotonic() for _ in range(num_tokens))

    def _closed_by_server(self) -> bool:
        assert self.sock is not None
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False  # open, nothing to read

    async def _receive(self) -> tuple[bytes, float]:
        """The next bytes, and the kernel's receive time of their last packet."""
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(1 << 16, 64)
                break
            except BlockingIOError:
                readable = loop.create_future()
                loop.add_reader(self.sock.fileno(), readable.set_result, None)
                try:
                    await readable
                finally:
                    loop.remove_reader(self.sock.fileno())
        if not data:
            raise ConnectionError("the router closed the connection")
        stamp = time.time()
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = struct.unpack("qq", value[:16])
                stamp = seconds + nanoseconds * 1e-9
        return data, stamp

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


class GrpcClient:
    def __init__(self, port: int) -> None:
        import grpc

        from proto.tandem.v1 import tandem_pb2, tandem_pb2_grpc

        self.pb = tandem_pb2
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = tandem_pb2_grpc.TandemStub(self.channel)

    async def complete(self, max_tokens: int) -> Sample:
        request = self.pb.GenerateRequest(
            prompt=PROMPT, params=self.pb.SamplingParams(max_tokens=max_tokens)
        )
        sample = Sample(status=200)
        async for chunk in self.stub.GenerateStream(request):
            now = time.monotonic()
            if not sample.request_id:
                sample.request_id = chunk.id
            sample.arrivals.extend(now for _ in chunk.token_ids)
        return sample

    def close(self) -> None:
        pass
