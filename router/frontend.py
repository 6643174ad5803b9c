"""What the HTTP and gRPC front doors share: a client's request checked and turned into
what Router.generate takes, and its deltas gathered into one completion.

The checks mirror the engine's (engine/sampling_params.py), so that a bad request is
refused here with the field named, before it reaches a worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field, replace

from proto.tandem.internal.v1 import worker_pb2
from router.core import Router
from router.errors import GenerationError, InvalidRequestError, ModelNotFoundError

INT64_MAX = 2**63 - 1
MAX_LOGPROBS = 20  # the engine's limit (engine/sampling_params.py)
MAX_N = 16  # choices per prompt


@dataclass(frozen=True)
class SamplingOptions:
    """The sampling knobs a client sets, with OpenAI's meanings. max_tokens None: as
    many as the context leaves."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # top alternatives per token; 0: the sampled token's only

    def to_params(self, num_prompt_tokens: int, router: Router) -> worker_pb2.SamplingParams:
        """Checked against the ranges and the model's context length."""
        self._check_ranges(router.vocab_size)
        max_tokens = _fit_context(num_prompt_tokens, self.max_tokens, router.max_model_len)
        return worker_pb2.SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            logit_bias=dict(self.logit_bias),
            logprobs=self.logprobs,
        )

    def for_choice(self, index: int) -> SamplingOptions:
        """The options of choice `index` of n: a seed, if given, is seed + index, so that
        the choices differ yet each is reproducible."""
        if self.seed is None or index == 0:
            return self
        return replace(self, seed=(self.seed + index + INT64_MAX + 1) % 2**64 - INT64_MAX - 1)

    def _check_ranges(self, vocab_size: int) -> None:
        _require(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1")
        _require(0.0 <= self.temperature <= 2.0, "temperature", "must be in [0, 2]")
        _require(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _require(self.top_k >= 0, "top_k", "must be >= 0 (0 disables it)")
        _require(
            self.seed is None or -INT64_MAX - 1 <= self.seed <= INT64_MAX,
            "seed",
            "must fit in 64 bits",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            _require(-2.0 <= getattr(self, name) <= 2.0, name, "must be in [-2, 2]")
        _require(all(self.stop), "stop", "stop strings must not be empty")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        _require(not bad, "stop_token_ids", f"{bad[:5]} are not token ids of this model")
        bad = [t for t, _ in self.logit_bias if not 0 <= t < vocab_size]
        _require(not bad, "logit_bias", f"{bad[:5]} are not token ids of this model")
        _require(
            all(-100.0 <= b <= 100.0 for _, b in self.logit_bias),
            "logit_bias",
            "biases must be in [-100, 100]",
        )
        _require(
            self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
            "logprobs",
            f"at most {MAX_LOGPROBS} alternatives per token can be returned",
        )


def check_n(n: int) -> None:
    _require(1 <= n <= MAX_N, "n", f"must be in [1, {MAX_N}]")


def model_names(router: Router) -> list[str]:
    """What a request may call the served model: its id, its name (the id before "@",
    which ends in a digest of the weights), or "default"."""
    return list(dict.fromkeys([router.model_id, router.model_id.split("@")[0], "default"]))


def check_model(router: Router, model: str | None) -> None:
    """A request that names a model must name the served one."""
    if model and model not in model_names(router):
        names = ", ".join(repr(n) for n in model_names(router))
        raise ModelNotFoundError(f"the model {model!r} is not served here; ask for {names}")


def prompt_token_ids(router: Router, prompt: str | Sequence[int]) -> list[int]:
    """The prompt's token ids: a text is encoded with the model's special tokens."""
    if isinstance(prompt, str):
        ids = router.tokenizer.encode(prompt) if prompt else []
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < router.vocab_size]
        _require(not bad, "prompt", f"{bad[:5]} are not token ids (vocab size {router.vocab_size})")
    _require(bool(ids), "prompt", "the prompt must not be empty")
    return ids


@dataclass
class Completion:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    logprobs: list[worker_pb2.TokenLogprob] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache

    def add(self, delta: worker_pb2.TokenDelta) -> None:
        """Appends one delta (in index order) of a request that did not fail."""
        if delta.index == 0:
            self.num_cached_tokens = delta.num_cached_tokens
        self.request_id = delta.request_id
        self.token_ids.extend(delta.token_ids)
        self.text += delta.text
        self.logprobs.extend(delta.logprobs)
        self.finish_reason = delta.finish_reason


async def collect(deltas: AsyncGenerator[worker_pb2.TokenDelta, None]) -> Completion:
    """All of a request's deltas as one completion. Raises GenerationError if it failed."""
    completion = Completion()
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            check_delta(delta)
            completion.add(delta)
    return completion


def check_delta(delta: worker_pb2.TokenDelta) -> worker_pb2.TokenDelta:
    """The delta; raises GenerationError if it reports that the request failed."""
    if delta.finish_reason == "error":
        raise GenerationError(delta.error or "the request failed on a worker (no detail given)")
    return delta


def _fit_context(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise InvalidRequestError(
            f"the prompt has {num_prompt_tokens} tokens, but this model's maximum context "
            f"length is {max_model_len} tokens, prompt and completion together; "
            "shorten the prompt",
            param="prompt",
        )
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise InvalidRequestError(
            f"this model's maximum context length is {max_model_len} tokens, but "
            f"{num_prompt_tokens + max_tokens} were asked for ({num_prompt_tokens} in the "
            f"prompt, {max_tokens} to generate); shorten the prompt or lower max_tokens",
            param="max_tokens",
        )
    return max_tokens


def _require(condition: bool, param: str, reason: str) -> None:
    if not condition:
        raise InvalidRequestError(f"invalid {param!r}: {reason}", param=param)
