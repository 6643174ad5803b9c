"""What the user asks of one request's generation. Validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidSamplingParamsError

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs, with OpenAI's meanings.

    temperature 0 means greedy. `seed` makes one request's samples reproducible
    whatever else is in the batch. `logprobs=N` returns the sampled token's
    log-probability and the top N alternatives (0 <= N <= 20), computed from
    the model's distribution before penalties and temperature.
    Stop strings are not included in the output text.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._validate()

    def _validate(self) -> None:
        _require(
            _is_int(self.max_tokens) and self.max_tokens >= 1,
            "max_tokens",
            "must be an integer >= 1",
        )
        _require(0.0 <= self.temperature <= 2.0, "temperature", "must be in [0, 2]")
        _require(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _require(
            _is_int(self.top_k) and self.top_k >= 0,
            "top_k",
            "must be an integer >= 0 (0 disables it)",
        )
        _require(self.seed is None or _is_int(self.seed), "seed", "must be an integer or None")
        for name in ("presence_penalty", "frequency_penalty"):
            _require(-2.0 <= getattr(self, name) <= 2.0, name, "must be in [-2, 2]")
        for token_id, bias in self.logit_bias.items():
            _require(
                _is_int(token_id) and token_id >= 0,
                "logit_bias",
                f"key {token_id!r} is not a token id",
            )
            _require(
                -100.0 <= bias <= 100.0,
                "logit_bias",
                f"bias {bias} for token {token_id} not in [-100, 100]",
            )
        for s in self.stop:
            _require(
                isinstance(s, str) and s != "", "stop", "stop strings must be non-empty strings"
            )
        for t in self.stop_token_ids:
            _require(_is_int(t) and t >= 0, "stop_token_ids", f"{t!r} is not a token id")
        _require(
            self.logprobs is None
            or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs",
            f"must be an integer in [0, {MAX_LOGPROBS}]",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids named by the params must exist in the model's vocabulary."""
        for name, ids in (
            ("logit_bias", self.logit_bias.keys()),
            ("stop_token_ids", self.stop_token_ids),
        ):
            bad = [t for t in ids if t >= vocab_size]
            _require(
                not bad, name, f"token ids {bad[:5]} are outside the vocabulary of {vocab_size}"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, field_name: str, reason: str) -> None:
    if not condition:
        raise InvalidSamplingParamsError(field_name, reason)
