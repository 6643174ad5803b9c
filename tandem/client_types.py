"""What tandem's client SDK sends, returns and raises: the options of a call, the
typed results, the errors (one class per gRPC status), and their conversion to and
from the tandem.v1 messages. The clients themselves are in tandem/client.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import grpc

from proto.tandem.v1 import tandem_pb2

Prompt = str | Sequence[int]
Messages = Sequence[Mapping[str, str]]


class Options(TypedDict, total=False):
    """What generate, generate_stream, chat and chat_stream take besides the prompt.
    Sampling fields left out take the router's defaults (max_tokens 16, temperature and
    top_p 1); see proto/tandem/v1/tandem.proto for their ranges."""

    model: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    presence_penalty: float
    frequency_penalty: float
    stop: str | Sequence[str]
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    logprobs: int  # per token: its logprob and this many top alternatives, in [0, 20]
    request_id: str  # the caller's own id, echoed back as `request_id`
    timeout: float  # seconds for the whole call; default: the client's


# -- results --------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int  # 1: the most likely token
    top: tuple[tuple[int, float], ...]  # (token_id, logprob) of the likeliest tokens


@dataclass(frozen=True)
class Completion:
    id: str  # the router's id of the request (what abort() takes)
    request_id: str  # the caller's, as sent ("" if none)
    model: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length" or "abort"
    usage: Usage
    logprobs: list[TokenLogprob]  # one per token id, if asked for


@dataclass(frozen=True)
class CompletionChunk:
    """One piece of a streamed completion; finish_reason and usage are on the last only."""

    id: str
    request_id: str
    model: str
    index: int  # position of the first of token_ids among the output tokens
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage | None
    logprobs: list[TokenLogprob]


@dataclass(frozen=True)
class Model:
    id: str
    owned_by: str
    max_model_len: int
    aliases: list[str]  # other names a request may give as `model`


# -- errors ---------------------------------------------------------------------------


class TandemClientError(Exception):
    """A call failed. `code` is its gRPC status code, `message` the router's reason."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(f"{message} ({code.name})")
        self.message = message
        self.code = code


class InvalidRequest(TandemClientError):
    """INVALID_ARGUMENT: the request cannot be served as sent; the message names the field."""


class NotFound(TandemClientError):
    """NOT_FOUND: e.g. a model this router does not serve."""


class Unauthenticated(TandemClientError):
    """UNAUTHENTICATED: no API key, or a wrong one (api_key=... or TANDEM_API_KEY)."""


class Overloaded(TandemClientError):
    """RESOURCE_EXHAUSTED: the router is full; try again after `retry_after` seconds."""

    def __init__(
        self, message: str, code: grpc.StatusCode, retry_after: float | None = None
    ) -> None:
        super().__init__(message, code)
        self.retry_after = retry_after


class Unavailable(TandemClientError):
    """UNAVAILABLE, after the retries: the router is unreachable, or no instance is free."""


class Timeout(TandemClientError):
    """DEADLINE_EXCEEDED: the call took longer than its timeout."""


class ServerError(TandemClientError):
    """INTERNAL, or any other code: the request failed on the router or a worker."""


_ERROR_TYPES: dict[grpc.StatusCode, type[TandemClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Timeout,
}


def client_error(error: grpc.RpcError) -> TandemClientError:
    """The typed error for a failed call (a grpc.Call or grpc.aio.AioRpcError)."""
    code, message = error.code(), error.details() or "no detail given"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(message, code, _retry_after(error.trailing_metadata()))
    return _ERROR_TYPES.get(code, ServerError)(message, code)


def _retry_after(metadata: Sequence[tuple[str, str | bytes]] | None) -> float | None:
    for key, value in metadata or ():
        if key == "retry-after":
            return float(value)
    return None


def generate_request(prompt: Prompt, options: Mapping[str, Any]) -> tandem_pb2.GenerateRequest:
    request = tandem_pb2.GenerateRequest(
        model=options.get("model") or "",
        params=sampling_params(options),
        request_id=options.get("request_id") or "",
    )
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.extend(prompt)
    return request


def chat_request(messages: Messages, options: Mapping[str, Any]) -> tandem_pb2.ChatRequest:
    for message in messages:
        unknown = set(message) - {"role", "content", "name"}
        if unknown:
            raise TypeError(f"a chat message has role, content and name; not {sorted(unknown)}")
    return tandem_pb2.ChatRequest(
        model=options.get("model") or "",
        messages=[tandem_pb2.ChatMessage(**message) for message in messages],
        params=sampling_params(options),
        request_id=options.get("request_id") or "",
    )


def sampling_params(options: Mapping[str, Any]) -> tandem_pb2.SamplingParams:
    unknown = set(options) - set(Options.__annotations__)
    if unknown:
        known = ", ".join(Options.__annotations__)
        raise TypeError(f"unknown option(s) {sorted(unknown)}; the options are: {known}")
    not_sampling = ("model", "request_id", "timeout")
    fields = {k: v for k, v in options.items() if v is not None and k not in not_sampling}
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    return tandem_pb2.SamplingParams(**fields)


def completion(response: tandem_pb2.GenerateResponse) -> Completion:
    return Completion(
        id=response.id,
        request_id=response.request_id,
        model=response.model,
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=response.finish_reason,
        usage=_usage(response.usage),
        logprobs=_logprobs(response.logprobs),
    )


def chunk(response: tandem_pb2.GenerateStreamResponse) -> CompletionChunk:
    return CompletionChunk(
        id=response.id,
        request_id=response.request_id,
        model=response.model,
        index=response.index,
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=response.finish_reason or None,
        usage=_usage(response.usage) if response.HasField("usage") else None,
        logprobs=_logprobs(response.logprobs),
    )


def models(response: tandem_pb2.ListModelsResponse) -> list[Model]:
    return [Model(m.id, m.owned_by, m.max_model_len, list(m.aliases)) for m in response.models]


def _usage(usage: tandem_pb2.Usage) -> Usage:
    return Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


def _logprobs(entries: Sequence[tandem_pb2.TokenLogprob]) -> list[TokenLogprob]:
    return [
        TokenLogprob(e.token_id, e.logprob, e.rank, tuple((t.token_id, t.logprob) for t in e.top))
        for e in entries
    ]


# -- the clients ----------------------------------------------------------------------
