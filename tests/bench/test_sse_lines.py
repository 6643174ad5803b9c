"""The benchmark client reads SSE events whose JSON carries line-separator characters.

orjson (tandem) and pydantic (vLLM) write U+2028, U+2029 and U+0085 unescaped inside
JSON strings; the SSE spec ends lines only at CR LF, LF or CR. A token holding one of
them must arrive as one event, not as a broken one that fails the request.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import orjson

from benchmarks.serving.client import SseLines, send
from benchmarks.serving.workloads import BenchRequest

TEXTS = ["Hello", " wor\u2028ld", "\u0085", " line\u2029 end", "\x0c."]


def events() -> bytes:
    chunks = [{"choices": [{"index": 0, "text": t}]} for t in TEXTS]
    chunks.append({"choices": [], "usage": {"completion_tokens": len(TEXTS)}})
    body = b"".join(b"data: " + orjson.dumps(c) + b"\r\n\r\n" for c in chunks)
    return body + b"data: [DONE]\r\n\r\n"


def test_lines_split_only_at_cr_lf_wherever_the_chunks_are_cut():
    text = events().decode()
    for cut in range(1, 40):
        lines, out = SseLines(), []
        for start in range(0, len(text), cut):
            out += lines.feed(text[start : start + cut])
        data = [line[6:] for line in out if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        assert [json.loads(d)["choices"][0]["text"] for d in data[:-2]] == TEXTS, cut


async def _serve_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")  # the request's head; its body is not needed
    body = events()
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
    writer.write(b"transfer-encoding: chunked\r\n\r\n")
    for start in range(0, len(body), 7):  # odd-sized chunks, cut anywhere
        piece = body[start : start + 7]
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    writer.close()


def test_send_reads_every_token_of_such_a_stream_over_http():
    async def run():
        server = await asyncio.start_server(_serve_once, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, httpx.AsyncClient(timeout=10) as client:
            request = BenchRequest([1, 2, 3], len(TEXTS), "sharegpt")
            return await send(client, f"http://127.0.0.1:{port}/v1/completions", "m", request, True)

    result = asyncio.run(run())
    assert result.success, result.error
    assert result.text == "".join(TEXTS)
    assert result.output_len == len(TEXTS)
    assert len(result.itls) == len(TEXTS) - 1
