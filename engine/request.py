"""A request inside one engine, and its lifecycle.

    add_request ──▶ WAITING ──schedule──▶ RUNNING ──update──▶ FINISHED_STOPPED
                       ▲                     │  │              FINISHED_LENGTH
                       └──── preempted ──────┘  │   abort ───▶ FINISHED_ABORTED
                                                │ first token, hold_after_prefill
    reserve ──▶ RESERVED ──commit──▶ RUNNING    └──▶ HELD ──release──▶ (gone)

A KV handoff moves a request between engines: the sender's copy is HELD (its
blocks kept, nothing scheduled) until the receiver has committed it; the
receiver's copy is RESERVED (blocks allocated, KV arriving) until commit puts
it in the running batch.

A RUNNING request is prefilling while num_computed_tokens < num_tokens - 1 is
possible only mid-prompt; once its whole context is computed, each step adds
one token. Preemption frees the blocks and sends it back to WAITING with
num_computed_tokens = 0: its prompt and the tokens generated so far are
recomputed (most of them usually hit the prefix cache).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    RESERVED = 2  # blocks allocated for KV computed elsewhere, not yet committed
    HELD = 3  # prefilled here, KV being handed off; never scheduled again
    # Every status from here on is final.
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probability of the sampled token and the top alternatives, best first."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: tuple[tuple[int, float], ...]


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    token_ids: list[int] = field(init=False)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose keys/values are in the cache
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks registered in the prefix cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    num_preemptions: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    first_token_time: float | None = None
    hold_after_prefill: bool = False  # a prefill instance's request: HELD after its first token

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
