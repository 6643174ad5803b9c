"""One streamed request to an OpenAI-compatible /v1/completions, timed by the client."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator

import httpx

from benchmarks.serving.stats import RequestResult
from benchmarks.serving.workloads import BenchRequest


class SseLines:
    """An SSE stream's lines, split where the spec splits them: at CR LF, LF or CR only.

    httpx's iter_lines() splits as str.splitlines() does, also at U+2028, U+0085 and
    other characters that a JSON string may carry unescaped (orjson and pydantic leave
    them raw), so a token holding one would cut its event in two."""

    def __init__(self) -> None:
        self._rest = ""

    def feed(self, text: str) -> list[str]:
        """The lines that `text` completes; the unfinished rest waits for the next."""
        text, self._rest = self._rest + text, ""
        if text.endswith("\r"):  # perhaps the first half of a CR LF: wait for the next
            text, self._rest = text[:-1], "\r"
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._rest = lines.pop() + self._rest
        return lines


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of a streamed SSE response (SseLines)."""
    lines = SseLines()
    async for text in response.aiter_text():
        for line in lines.feed(text):
            yield line


def sse_lines_sync(response: httpx.Response) -> Iterator[str]:
    """sse_lines for a blocking httpx response."""
    lines = SseLines()
    for text in response.iter_text():
        yield from lines.feed(text)


def completion_body(
    model: str, request: BenchRequest, ignore_eos: bool = True
) -> dict[str, object]:
    body: dict[str, object] = {
        "model": model,
        "prompt": request.prompt_token_ids,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True  # a vLLM extension that tandem accepts too
    return body


async def send(
    client: httpx.AsyncClient, url: str, model: str, request: BenchRequest, ignore_eos: bool
) -> RequestResult:
    """Streams one completion. Every SSE event with choices is a token arrival (as in
    vLLM's benchmark); the usage event gives the number of output tokens."""
    result = RequestResult(prompt_len=request.prompt_len, kind=request.kind)
    start = time.perf_counter()
    last = start
    output_len = None
    text: list[str] = []
    try:
        async with client.stream(
            "POST", url, json=completion_body(model, request, ignore_eos)
        ) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")[:500]
                return result
            async for line in sse_lines(response):
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    result.error = json.dumps(event["error"])[:500]
                    return result
                now = time.perf_counter()
                if event.get("choices"):
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                    text.append(event["choices"][0].get("text") or "")
                if event.get("usage"):
                    output_len = event["usage"].get("completion_tokens")
    except (httpx.HTTPError, OSError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if result.ttft is None:
        result.error = "the stream ended without a token"
        return result
    result.success = True
    result.latency = last - start
    result.output_len = output_len if output_len is not None else len(text)
    result.text = "".join(text)
    return result
