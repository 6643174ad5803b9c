"""What the engine returns to its caller, per request and per step."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import TokenLogprobs


@dataclass
class RequestOutput:
    """The state of one request after a step.

    `new_token_ids` and `new_text` are what this step added (for streaming);
    `token_ids` and `text` are everything generated so far.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    logprobs: list[TokenLogprobs] | None = None
    num_cached_tokens: int = 0
