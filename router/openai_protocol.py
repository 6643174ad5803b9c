"""The OpenAI request bodies the router accepts, and the response shapes it writes.

Only what tandem serves is modelled; unknown fields are ignored, as OpenAI clients send
many. Fields tandem does not support yet (n > 1, logprobs, echo) are refused with 400
rather than silently ignored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from proto.tandem.internal.v1 import worker_pb2
from router.errors import InvalidRequestError
from router.frontend import Completion, SamplingOptions


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
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling_options(self, max_tokens: int | None) -> SamplingOptions:
        if self.n != 1:
            raise InvalidRequestError("only n=1 is supported", param="n")
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
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingBody):
    prompt: str | list[StrictInt]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

    def options(self) -> SamplingOptions:
        _refuse(self.logprobs is not None, "logprobs")
        _refuse(self.echo, "echo")
        return self.sampling_options(self.max_tokens)


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

    def options(self) -> SamplingOptions:
        _refuse(self.logprobs, "logprobs")
        return self.sampling_options(_or(self.max_completion_tokens, self.max_tokens))


@dataclass(frozen=True)
class ResponseFormat:
    """Writes one request's responses: the whole completion, or the stream's chunks."""

    kind: Literal["completion", "chat"]
    model: str
    prompt_token_ids: tuple[int, ...]
    return_token_ids: bool
    created: int

    @classmethod
    def for_request(
        cls,
        kind: Literal["completion", "chat"],
        model: str,
        prompt_token_ids: list[int],
        body: _SamplingBody,
    ) -> ResponseFormat:
        return cls(kind, model, tuple(prompt_token_ids), body.return_token_ids, int(time.time()))

    def usage(self, num_completion_tokens: int) -> dict[str, int]:
        num_prompt_tokens = len(self.prompt_token_ids)
        return {
            "prompt_tokens": num_prompt_tokens,
            "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens,
        }

    def response(self, completion: Completion) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": completion.finish_reason}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": completion.text}
        else:
            choice.update(text=completion.text, logprobs=None)
        if self.return_token_ids:
            choice.update(prompt_token_ids=list(self.prompt_token_ids))
            choice.update(token_ids=completion.token_ids)
        return {
            **self._header(completion.request_id, stream=False),
            "choices": [choice],
            "usage": self.usage(len(completion.token_ids)),
        }

    def chunk(self, delta: worker_pb2.TokenDelta, first: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": delta.finish_reason or None}
        if self.kind == "chat":
            message = {"content": delta.text} if delta.text or first else {}
            choice["delta"] = {"role": "assistant", **message} if first else message
        else:
            choice.update(text=delta.text, logprobs=None)
        if self.return_token_ids:
            if first:
                choice.update(prompt_token_ids=list(self.prompt_token_ids))
            choice.update(token_ids=list(delta.token_ids))
        return {**self._header(delta.request_id, stream=True), "choices": [choice]}

    def usage_chunk(self, request_id: str, num_completion_tokens: int) -> dict[str, Any]:
        return {
            **self._header(request_id, stream=True),
            "choices": [],
            "usage": self.usage(num_completion_tokens),
        }

    def _header(self, request_id: str, stream: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if stream else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": request_id, "object": obj, "created": self.created, "model": self.model}


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _refuse(asked: bool, param: str) -> None:
    if asked:
        raise InvalidRequestError(f"{param!r} is not supported by tandem yet", param=param)
