"""The OpenAI request bodies the router accepts, and the response shapes it writes.

Only what tandem serves is modelled; unknown fields are ignored, as OpenAI clients send
many. Fields tandem does not support (echo, best_of > n, suffix) are refused with 400
rather than silently ignored.

A request has one or more prompts (a completions request may send a list), each
sampled `n` times: choice `i * n + j` is prompt i's j-th sample, as in OpenAI's API.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from proto.tandem.internal.v1 import worker_pb2
from router.errors import InvalidRequestError
from router.frontend import Completion, SamplingOptions, check_n

TokenText = Callable[[int], str]  # a token id's text, for logprobs


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingBody(_Body):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # a vLLM extension, as are stop_token_ids and ignore_eos
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False  # vLLM's: the prompt's and the completion's token ids
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling_options(self, max_tokens: int | None, logprobs: int | None) -> SamplingOptions:
        check_n(self.n)
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=_or(self.temperature, 1.0),
            top_p=_or(self.top_p, 1.0),
            top_k=_or(self.top_k, 0),
            seed=self.seed,
            presence_penalty=_or(self.presence_penalty, 0.0),
            frequency_penalty=_or(self.frequency_penalty, 0.0),
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logit_bias=_logit_bias(self.logit_bias),
            logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingBody):
    prompt: str | list[StrictInt] | list[str | list[StrictInt]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def options(self) -> SamplingOptions:
        _refuse(self.echo, "echo")
        _refuse(self.suffix is not None, "suffix")
        _refuse(self.best_of is not None and self.best_of != self.n, "best_of")
        return self.sampling_options(self.max_tokens, self.logprobs)

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per entry: a text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidRequestError("the prompt must not be empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: content as one string."""
        message: dict[str, Any] = {"role": self.role, "content": self._text()}
        if self.name is not None:
            message["name"] = self.name
        return message

    def _text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise InvalidRequestError(
                    f"message content of type {part.type!r} is not supported; send text",
                    param="messages",
                )
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def options(self) -> SamplingOptions:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = _or(self.top_logprobs, 0) if self.logprobs else None
        return self.sampling_options(_or(self.max_completion_tokens, self.max_tokens), logprobs)


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[StrictInt]


@dataclass(frozen=True)
class ResponseFormat:
    """Writes one request's responses: the whole completion, or the stream's chunks.

    `prompt_token_ids` holds each prompt's ids; choice c belongs to prompt c // n.
    """

    kind: Literal["completion", "chat"]
    model: str
    request_id: str
    prompt_token_ids: tuple[tuple[int, ...], ...]
    n: int
    return_token_ids: bool
    logprobs: bool
    token_text: TokenText
    created: int

    @classmethod
    def for_request(
        cls,
        kind: Literal["completion", "chat"],
        model: str,
        request_id: str,
        prompt_token_ids: Sequence[Sequence[int]],
        body: _SamplingBody,
        logprobs: bool,
        token_text: TokenText,
    ) -> ResponseFormat:
        return cls(
            kind,
            model,
            request_id,
            tuple(tuple(p) for p in prompt_token_ids),
            body.n,
            body.return_token_ids,
            logprobs,
            token_text,
            int(time.time()),
        )

    @property
    def num_choices(self) -> int:
        return len(self.prompt_token_ids) * self.n

    def usage(self, num_completion_tokens: int, num_cached_tokens: int) -> dict[str, Any]:
        # Each prompt is counted once per sample, as its KV is built for each.
        num_prompt_tokens = sum(len(p) for p in self.prompt_token_ids) * self.n
        return {
            "prompt_tokens": num_prompt_tokens,
            "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens,
            "prompt_tokens_details": {"cached_tokens": num_cached_tokens},
        }

    def response(self, completions: Sequence[Completion]) -> dict[str, Any]:
        choices = []
        for index, completion in enumerate(completions):
            choice: dict[str, Any] = {"index": index, "finish_reason": completion.finish_reason}
            logprobs = self._logprobs(completion.logprobs) if self.logprobs else None
            if self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": completion.text}
                choice["logprobs"] = logprobs
            else:
                choice.update(text=completion.text, logprobs=logprobs)
            if self.return_token_ids:
                choice.update(prompt_token_ids=list(self.prompt_token_ids[index // self.n]))
                choice.update(token_ids=completion.token_ids)
            choices.append(choice)
        return {
            **self._header(stream=False),
            "choices": choices,
            "usage": self.usage(
                sum(len(c.token_ids) for c in completions),
                sum(c.num_cached_tokens for c in completions),
            ),
        }

    def chunk(self, index: int, delta: worker_pb2.TokenDelta, first: bool) -> dict[str, Any]:
        """The chunk of choice `index` for one delta; `first`: the choice's first chunk."""
        choice: dict[str, Any] = {"index": index, "finish_reason": delta.finish_reason or None}
        logprobs = self._logprobs(delta.logprobs) if self.logprobs else None
        if self.kind == "chat":
            message = {"content": delta.text} if delta.text or first else {}
            choice["delta"] = {"role": "assistant", **message} if first else message
            choice["logprobs"] = logprobs
        else:
            choice.update(text=delta.text, logprobs=logprobs)
        if self.return_token_ids:
            if first:
                choice.update(prompt_token_ids=list(self.prompt_token_ids[index // self.n]))
            choice.update(token_ids=list(delta.token_ids))
        return {**self._header(stream=True), "choices": [choice]}

    def chunk_json(self, index: int, delta: worker_pb2.TokenDelta, first: bool) -> bytes:
        """chunk() as JSON. Without logprobs or token ids (the common case) it is written
        from bytes made once per request, not through a dict: every token passes here."""
        if self.logprobs or self.return_token_ids:
            return orjson.dumps(self.chunk(index, delta, first))
        finish_reason = orjson.dumps(delta.finish_reason) if delta.finish_reason else b"null"
        if self.kind == "chat":
            if first:
                content = b'{"role":"assistant","content":%s}' % orjson.dumps(delta.text)
            elif delta.text:
                content = b'{"content":%s}' % orjson.dumps(delta.text)
            else:
                content = b"{}"
            choice = b'"finish_reason":%s,"delta":%s,"logprobs":null' % (finish_reason, content)
        else:
            text = orjson.dumps(delta.text)
            choice = b'"finish_reason":%s,"text":%s,"logprobs":null' % (finish_reason, text)
        return b"%s%d,%s}]}" % (self._chunk_prefix, index, choice)

    @functools.cached_property
    def _chunk_prefix(self) -> bytes:
        """A chunk's JSON up to its choice's index: '{"id": ..., "choices":[{"index":'."""
        return orjson.dumps(self._header(stream=True))[:-1] + b',"choices":[{"index":'

    def usage_chunk(self, num_completion_tokens: int, num_cached_tokens: int) -> dict[str, Any]:
        return {
            **self._header(stream=True),
            "choices": [],
            "usage": self.usage(num_completion_tokens, num_cached_tokens),
        }

    def _logprobs(self, entries: Sequence[worker_pb2.TokenLogprob]) -> dict[str, Any]:
        text = self.token_text
        if self.kind == "chat":
            return {
                "content": [
                    {
                        **_chat_logprob(text(e.token_id), e.logprob),
                        "top_logprobs": [_chat_logprob(text(t.token_id), t.logprob) for t in e.top],
                    }
                    for e in entries
                ]
            }
        tokens = [text(e.token_id) for e in entries]
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text(t.token_id): t.logprob for t in e.top} for e in entries],
            "text_offset": [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))],
        }

    def _header(self, stream: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if stream else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}


def _chat_logprob(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    out = []
    for key, value in (bias or {}).items():
        try:
            out.append((int(key), float(value)))
        except ValueError:
            raise InvalidRequestError(
                f"logit_bias keys are token ids, got {key!r}", param="logit_bias"
            ) from None
    return tuple(out)


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _refuse(asked: bool, param: str) -> None:
    if asked:
        raise InvalidRequestError(f"{param!r} is not supported by tandem yet", param=param)
