"""tandem's Python SDK: `Client` and `AsyncClient` over the router's gRPC API.

    with tandem.Client("127.0.0.1:50051") as client:
        print(client.generate("The capital of France is", max_tokens=8).text)
        for chunk in client.generate_stream("Once upon a time", max_tokens=32):
            print(chunk.text, end="")

    async with tandem.AsyncClient() as client:
        reply = await client.chat([{"role": "user", "content": "Hi!"}], max_tokens=32)
        async with contextlib.aclosing(client.generate_stream("Hi")) as chunks:
            async for chunk in chunks:
                ...

Every failure raises a TandemClientError subclass chosen by the status code. A call that
fails with UNAVAILABLE (the router cannot be reached, or has no instance free) is tried
again up to `max_retries` times with a short backoff; a stream only until its first
chunk has arrived, so that no token is ever repeated. `timeout` bounds a whole call,
retries included. A stream sends its request when iteration starts; closing it (or
breaking out of a loop over it) cancels the call, which ends the request on the workers.

The one environment variable read here: TANDEM_API_KEY, the API key when none is given.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import grpc

from proto.tandem.v1 import tandem_pb2, tandem_pb2_grpc
from tandem.client_types import (
    Completion,
    CompletionChunk,
    InvalidRequest,
    Messages,
    Model,
    NotFound,
    Options,
    Overloaded,
    Prompt,
    ServerError,
    TandemClientError,
    Timeout,
    Unauthenticated,
    Unavailable,
    Usage,
    chat_request,
    chunk,
    client_error,
    completion,
    generate_request,
    models,
)

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack

__all__ = [  # the clients, and what they return and raise (tandem/client_types.py)
    "AsyncClient",
    "Client",
    "Completion",
    "CompletionChunk",
    "InvalidRequest",
    "Model",
    "NotFound",
    "Overloaded",
    "ServerError",
    "TandemClientError",
    "Timeout",
    "Unauthenticated",
    "Unavailable",
    "Usage",
]

DEFAULT_TARGET = "127.0.0.1:50051"
API_KEY_ENV = "TANDEM_API_KEY"
RETRY_BACKOFF_S = (0.2, 2.0)  # the first wait before a retry, and the longest
# Reconnect soon after a refused connection, so that a retry can find a router that
# has just come up (gRPC's own default waits 1 s, then longer).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

# -- what both clients share ----------------------------------------------------------


class _Settings:
    """Target, credentials, timeout and retries; requests and responses converted."""

    def __init__(
        self,
        target: str,
        api_key: str | None,
        timeout: float | None,
        max_retries: int,
        secure: bool,
        root_certificates: bytes | None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.target = target
        self.timeout = timeout
        self.max_retries = max_retries
        self.secure = secure or root_certificates is not None
        self.root_certificates = root_certificates
        api_key = api_key or os.environ.get(API_KEY_ENV) or None
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.secure:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)

    def deadline(self, options: Mapping[str, Any]) -> float | None:
        timeout = options.get("timeout")
        timeout = self.timeout if timeout is None else timeout
        return None if timeout is None else time.monotonic() + timeout

    def should_retry(self, error: grpc.RpcError, attempt: int, deadline: float | None) -> bool:
        """Whether to try again after `attempt` (0: the first) failed with `error`."""
        if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.max_retries:
            return False
        return deadline is None or time.monotonic() + backoff(attempt) < deadline


def backoff(attempt: int) -> float:
    first, longest = RETRY_BACKOFF_S
    return float(min(first * 2**attempt, longest))


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


class Client:
    """A blocking client of one router. Thread-safe; close it (or use `with`) when done.

    `api_key`: sent as `authorization: Bearer <key>`; default: $TANDEM_API_KEY.
    `timeout`: default seconds per call, retries included (None: no limit).
    `secure`: TLS, checked against the system's root certificates, or against
    `root_certificates` (PEM) when given (which implies secure).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        max_retries: int = 2,
        secure: bool = False,
        root_certificates: bytes | None = None,
    ) -> None:
        self._settings = _Settings(target, api_key, timeout, max_retries, secure, root_certificates)
        credentials = self._settings.credentials()
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self._stub = tandem_pb2_grpc.TandemStub(self._channel)

    def generate(self, prompt: Prompt, **options: Unpack[Options]) -> Completion:
        """The whole completion of a prompt: text, or token ids."""
        request = generate_request(prompt, options)
        return completion(self._unary(self._stub.Generate, request, options))

    def generate_stream(
        self, prompt: Prompt, **options: Unpack[Options]
    ) -> Iterator[CompletionChunk]:
        """The completion piece by piece, as the tokens come."""
        request = generate_request(prompt, options)
        return self._stream(self._stub.GenerateStream, request, options)

    def chat(self, messages: Messages, **options: Unpack[Options]) -> Completion:
        """The assistant's reply to `messages` ({"role": ..., "content": ...} each)."""
        request = chat_request(messages, options)
        return completion(self._unary(self._stub.Chat, request, options))

    def chat_stream(
        self, messages: Messages, **options: Unpack[Options]
    ) -> Iterator[CompletionChunk]:
        request = chat_request(messages, options)
        return self._stream(self._stub.ChatStream, request, options)

    def abort(self, id: str, *, timeout: float | None = None) -> bool:
        """Stop a request in flight by its `id`; False if it is not in flight."""
        request = tandem_pb2.AbortRequest(id=id)
        return bool(self._unary(self._stub.Abort, request, _timeout(timeout)).found)

    def list_models(self, *, timeout: float | None = None) -> list[Model]:
        request = tandem_pb2.ListModelsRequest()
        return models(self._unary(self._stub.ListModels, request, _timeout(timeout)))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _unary(self, method: Any, request: Any, options: Mapping[str, Any]) -> Any:
        deadline = self._settings.deadline(options)
        attempt = 0
        while True:
            try:
                return method(
                    request, timeout=remaining(deadline), metadata=self._settings.metadata
                )
            except grpc.RpcError as e:
                if not self._settings.should_retry(e, attempt, deadline):
                    raise client_error(e) from e
            time.sleep(backoff(attempt))
            attempt += 1

    def _stream(
        self, method: Any, request: Any, options: Mapping[str, Any]
    ) -> Iterator[CompletionChunk]:
        deadline = self._settings.deadline(options)
        attempt = 0
        while True:
            call = method(request, timeout=remaining(deadline), metadata=self._settings.metadata)
            try:
                first = next(call, None)
                break
            except grpc.RpcError as e:
                if not self._settings.should_retry(e, attempt, deadline):
                    raise client_error(e) from e
            time.sleep(backoff(attempt))
            attempt += 1
        try:
            if first is not None:
                yield chunk(first)
                for response in call:
                    yield chunk(response)
        except grpc.RpcError as e:
            raise client_error(e) from e
        finally:
            call.cancel()


class AsyncClient:
    """An asyncio client of one router (grpc.aio); the options are Client's. Use it on
    one event loop; close it (or use `async with`) when done."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        max_retries: int = 2,
        secure: bool = False,
        root_certificates: bytes | None = None,
    ) -> None:
        self._settings = _Settings(target, api_key, timeout, max_retries, secure, root_certificates)
        self._channel: grpc.aio.Channel | None = None  # opened on the first call's loop
        self._stub_: tandem_pb2_grpc.TandemStub | None = None

    async def generate(self, prompt: Prompt, **options: Unpack[Options]) -> Completion:
        """The whole completion of a prompt: text, or token ids."""
        request = generate_request(prompt, options)
        return completion(await self._unary("Generate", request, options))

    def generate_stream(
        self, prompt: Prompt, **options: Unpack[Options]
    ) -> AsyncIterator[CompletionChunk]:
        """The completion piece by piece; close it (contextlib.aclosing) to stop early."""
        request = generate_request(prompt, options)
        return self._stream("GenerateStream", request, options)

    async def chat(self, messages: Messages, **options: Unpack[Options]) -> Completion:
        """The assistant's reply to `messages` ({"role": ..., "content": ...} each)."""
        request = chat_request(messages, options)
        return completion(await self._unary("Chat", request, options))

    def chat_stream(
        self, messages: Messages, **options: Unpack[Options]
    ) -> AsyncIterator[CompletionChunk]:
        request = chat_request(messages, options)
        return self._stream("ChatStream", request, options)

    async def abort(self, id: str, *, timeout: float | None = None) -> bool:
        """Stop a request in flight by its `id`; False if it is not in flight."""
        request = tandem_pb2.AbortRequest(id=id)
        return bool((await self._unary("Abort", request, _timeout(timeout))).found)

    async def list_models(self, *, timeout: float | None = None) -> list[Model]:
        request = tandem_pb2.ListModelsRequest()
        return models(await self._unary("ListModels", request, _timeout(timeout)))

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub_ = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _method(self, name: str) -> Any:
        if self._stub_ is None:
            target, credentials = self._settings.target, self._settings.credentials()
            if credentials is None:
                self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            else:
                self._channel = grpc.aio.secure_channel(target, credentials, CHANNEL_OPTIONS)
            self._stub_ = tandem_pb2_grpc.TandemStub(self._channel)
        return getattr(self._stub_, name)

    async def _unary(self, name: str, request: Any, options: Mapping[str, Any]) -> Any:
        deadline = self._settings.deadline(options)
        attempt = 0
        while True:
            call = self._method(name)(
                request, timeout=remaining(deadline), metadata=self._settings.metadata
            )
            try:
                return await call
            except grpc.RpcError as e:
                if not self._settings.should_retry(e, attempt, deadline):
                    raise client_error(e) from e
            await asyncio.sleep(backoff(attempt))
            attempt += 1

    async def _stream(
        self, name: str, request: Any, options: Mapping[str, Any]
    ) -> AsyncIterator[CompletionChunk]:
        deadline = self._settings.deadline(options)
        attempt = 0
        while True:
            call = self._method(name)(
                request, timeout=remaining(deadline), metadata=self._settings.metadata
            )
            try:
                response = await call.read()
                break
            except grpc.RpcError as e:
                if not self._settings.should_retry(e, attempt, deadline):
                    raise client_error(e) from e
            await asyncio.sleep(backoff(attempt))
            attempt += 1
        try:
            while response is not grpc.aio.EOF:
                yield chunk(response)
                response = await call.read()
        except grpc.RpcError as e:
            raise client_error(e) from e
        finally:
            call.cancel()


def _timeout(timeout: float | None) -> dict[str, float]:
    """The options of a call that takes only a timeout."""
    return {} if timeout is None else {"timeout": timeout}
