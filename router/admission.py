"""Admission control: the bounds past which the router refuses a new request at once
(HTTP 429, gRPC RESOURCE_EXHAUSTED) instead of queueing it without limit.

    max_in_flight              requests on the workers
    max_waiting_prompt_tokens  prompt tokens not yet answered by a first token

A refusal says when to retry: the time the waiting prompts should take at the rate
prompts have been answered lately (1 to 60 s).
"""

from __future__ import annotations

import math
import time

from router.errors import OverloadedError


class _PrefillRate:
    """Prompt tokens answered per second (a moving average)."""

    def __init__(self, initial: float = 1000.0, weight: float = 0.2) -> None:
        self.tokens_per_s = initial
        self._weight = weight
        self._last: float | None = None

    def answered(self, num_tokens: int, now: float) -> None:
        if self._last is not None and now > self._last:
            rate = num_tokens / (now - self._last)
            self.tokens_per_s += self._weight * (rate - self.tokens_per_s)
        self._last = now


class Admission:
    def __init__(self, max_in_flight: int, max_waiting_prompt_tokens: int) -> None:
        self.max_in_flight = max_in_flight
        self.max_waiting_prompt_tokens = max_waiting_prompt_tokens
        self.waiting_prompt_tokens = 0
        self._prefill_rate = _PrefillRate()

    def check(self, num_in_flight: int, num_prompt_tokens: int) -> None:
        """Raises OverloadedError if one more request of this size passes a bound."""
        waiting = self.waiting_prompt_tokens
        if num_in_flight >= self.max_in_flight:
            raise OverloadedError(
                f"{num_in_flight} requests are in flight, the most this router admits "
                "(max_in_flight); retry later",
                self.retry_after(),
            )
        if waiting and waiting + num_prompt_tokens > self.max_waiting_prompt_tokens:
            raise OverloadedError(
                f"{waiting} prompt tokens are waiting for prefill, and this prompt's "
                f"{num_prompt_tokens} would pass the bound of "
                f"{self.max_waiting_prompt_tokens} (max_waiting_prompt_tokens); retry later",
                self.retry_after(),
            )

    def admitted(self, num_prompt_tokens: int) -> None:
        self.waiting_prompt_tokens += num_prompt_tokens

    def answered(self, num_prompt_tokens: int) -> None:
        """An admitted prompt got its first token (or its request ended)."""
        self.waiting_prompt_tokens -= num_prompt_tokens
        self._prefill_rate.answered(num_prompt_tokens, time.monotonic())

    def retry_after(self) -> float:
        """Seconds until the prompts waiting now are likely to be answered (1 to 60)."""
        seconds = self.waiting_prompt_tokens / max(self._prefill_rate.tokens_per_s, 1.0)
        return float(min(60, max(1, math.ceil(seconds))))
