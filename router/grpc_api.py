"""The router's public gRPC API: the `tandem.v1.Tandem` service (proto/tandem/v1).

`start_grpc_server` serves, on one port:

    tandem.v1.Tandem                     Generate, GenerateStream, Chat, ChatStream,
                                         Abort, ListModels
    grpc.health.v1.Health                SERVING for "" and "tandem.v1.Tandem";
                                         NOT_SERVING after set_serving(False) or stop()
    grpc.reflection.v1alpha.ServerReflection   for all three

With API keys, every call needs the metadata `authorization: Bearer <key>`, except the
health and reflection services: load balancers probe health without credentials, and
reflection only describes the schema, which is public (this repository, the SDK).

Generate, GenerateStream, Chat and ChatStream run on the same Router as the HTTP API.
A client that cancels its call ends the request on the workers: grpc.aio cancels the
handler, and Router.generate sends Abort as its generator closes. Router errors map to
status codes (STATUS_CODES; see router/errors.py).
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto.tandem.internal.v1 import worker_pb2
from proto.tandem.v1 import tandem_pb2, tandem_pb2_grpc
from router.core import Router
from router.errors import (
    AuthenticationError,
    GenerationError,
    InvalidRequestError,
    ModelNotFoundError,
    NoInstanceError,
    NotReadyError,
    OverloadedError,
    RouterError,
)
from router.frontend import (
    SamplingOptions,
    check_delta,
    check_model,
    model_names,
    prompt_token_ids,
)

Deltas = AsyncGenerator[worker_pb2.TokenDelta, None]
Pieces = AsyncGenerator[tandem_pb2.GenerateStreamResponse, None]
CompletionRequest = tandem_pb2.GenerateRequest | tandem_pb2.ChatRequest

STATUS_CODES: list[tuple[type[RouterError], grpc.StatusCode]] = [
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (NoInstanceError, grpc.StatusCode.UNAVAILABLE),
    (NotReadyError, grpc.StatusCode.UNAVAILABLE),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (GenerationError, grpc.StatusCode.INTERNAL),
    (RouterError, grpc.StatusCode.INTERNAL),
]

SERVICE_NAME = tandem_pb2.DESCRIPTOR.services_by_name["Tandem"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
MAX_LOGPROBS = 20  # as the engine allows (engine/sampling_params.py)


class TandemService(tandem_pb2_grpc.TandemServicer):
    def __init__(self, router: Router) -> None:
        self._router = router

    async def Generate(
        self, request: tandem_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> tandem_pb2.GenerateResponse:
        return await self._unary(request, context)

    async def GenerateStream(
        self, request: tandem_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tandem_pb2.GenerateStreamResponse]:
        async for piece in self._stream(request, context):
            yield piece

    async def Chat(
        self, request: tandem_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> tandem_pb2.GenerateResponse:
        return await self._unary(request, context)

    async def ChatStream(
        self, request: tandem_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tandem_pb2.GenerateStreamResponse]:
        async for piece in self._stream(request, context):
            yield piece

    async def _unary(
        self, request: CompletionRequest, context: grpc.aio.ServicerContext
    ) -> tandem_pb2.GenerateResponse:
        async with _status_on_error(context):
            response = await _collect(self._pieces(request))
        return response

    async def _stream(
        self, request: CompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tandem_pb2.GenerateStreamResponse]:
        async with _status_on_error(context):
            pieces = self._pieces(request)
            async with contextlib.aclosing(pieces):
                async for piece in pieces:
                    yield piece

    async def Abort(
        self, request: tandem_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> tandem_pb2.AbortResponse:
        return tandem_pb2.AbortResponse(found=self._router.abort(request.id))

    async def ListModels(
        self, request: tandem_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> tandem_pb2.ListModelsResponse:
        model_id = self._router.model_id
        model = tandem_pb2.Model(
            id=model_id,
            owned_by="tandem",
            max_model_len=self._router.max_model_len,
            aliases=[name for name in model_names(self._router) if name != model_id],
        )
        return tandem_pb2.ListModelsResponse(models=[model])

    def _prompt_ids(self, request: tandem_pb2.GenerateRequest) -> list[int]:
        if request.prompt and request.prompt_token_ids:
            raise InvalidRequestError(
                "send the prompt as text or as token ids, not both", param="prompt"
            )
        return prompt_token_ids(self._router, request.prompt or request.prompt_token_ids)

    def _chat_ids(self, request: tandem_pb2.ChatRequest) -> list[int]:
        messages = [_template_message(m) for m in request.messages]
        return self._router.tokenizer.encode_chat(messages)

    async def _pieces(self, request: CompletionRequest) -> Pieces:
        """The request's completion, one stream response per delta; the last one carries
        finish_reason and usage. Raises GenerationError if it fails on the way."""
        check_model(self._router, request.model)
        if isinstance(request, tandem_pb2.ChatRequest):
            prompt_ids = self._chat_ids(request)
        else:
            prompt_ids = self._prompt_ids(request)
        params = _options(request.params).to_params(len(prompt_ids), self._router)
        if request.params.HasField("logprobs"):
            params.logprobs = _checked_logprobs(request.params.logprobs)
        deltas = self._router.generate(prompt_ids, params)
        num_tokens = 0
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                check_delta(delta)
                num_tokens += len(delta.token_ids)
                yield tandem_pb2.GenerateStreamResponse(
                    id=delta.request_id,
                    model=self._router.model_id,
                    index=delta.index,
                    text=delta.text,
                    token_ids=delta.token_ids,
                    finish_reason=delta.finish_reason,
                    usage=_usage(len(prompt_ids), num_tokens) if delta.finished else None,
                    request_id=request.request_id,
                    logprobs=[_logprob(entry) for entry in delta.logprobs],
                )


class TandemGrpcServer(grpc.aio.Server):
    """A started grpc.aio server with the Tandem, health and reflection services.

    `port` is the bound port (the one chosen when 0 was asked for). `set_serving` flips
    the health status, e.g. to NOT_SERVING while draining; `stop` sets NOT_SERVING for
    good (health watchers see it as the grace period begins), then stops the server."""

    def __init__(self, server: grpc.aio.Server, health: health.aio.HealthServicer, port: int):
        self._server = server
        self._health = health
        self.port = port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING
        if not serving:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    async def stop(self, grace: float | None) -> None:
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)

    async def start(self) -> None:
        await self._server.start()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self._server.wait_for_termination(timeout)

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]
    ) -> None:
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: Any) -> None:
        self._server.add_registered_method_handlers(service_name, method_handlers)

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)


async def start_grpc_server(
    router: Router,
    host: str,
    port: int,
    *,
    api_keys: Sequence[str] = (),
    tls: tuple[bytes, bytes] | None = None,
) -> TandemGrpcServer:
    """Serve the Tandem API (with health and reflection) on host:port, started.

    port 0 picks a free port (the returned server's `port`). `api_keys`: if any, calls
    must send one of them (module docstring). `tls`: (certificate chain PEM, private
    key PEM) to serve TLS; plain text without it. Stop it with `await server.stop(grace)`.
    """
    interceptors = [ApiKeyInterceptor(api_keys)] if api_keys else []
    server = grpc.aio.server(interceptors=interceptors)
    add_to_server(router, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    bare_ipv6 = ":" in host and not host.startswith("[")
    address = f"[{host}]:{port}" if bare_ipv6 else f"{host}:{port}"
    if tls is None:
        bound_port = server.add_insecure_port(address)
    else:
        credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
        bound_port = server.add_secure_port(address, credentials)
    wrapped = TandemGrpcServer(server, health_servicer, bound_port)
    await wrapped.set_serving(True)
    await server.start()
    return wrapped


def add_to_server(router: Router, server: grpc.aio.Server) -> None:
    """The Tandem service alone (no health, reflection or API keys) on `server`."""
    tandem_pb2_grpc.add_TandemServicer_to_server(TandemService(router), server)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, calls without `authorization: Bearer <key>` for one
    of `api_keys`; the health and reflection services stay open."""

    OPEN_SERVICES = (HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)

    def __init__(self, api_keys: Sequence[str]) -> None:
        if not all(api_keys):
            raise ValueError("an API key must not be empty")
        self._keys = [key.encode() for key in api_keys]

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.strip("/").split("/")[0]
        if handler is None or service in self.OPEN_SERVICES:
            return handler
        problem = self._problem(dict(handler_call_details.invocation_metadata or ()))
        return handler if problem is None else _refusal(handler, problem)

    def _problem(self, metadata: dict[str, str | bytes]) -> str | None:
        """Why the call's credentials are refused; None if they are not."""
        how = (
            "send the metadata 'authorization: Bearer <key>' with every call "
            "(tandem.Client(api_key=...) or the TANDEM_API_KEY environment variable)"
        )
        value = metadata.get("authorization")
        if value is None:
            return f"this server needs an API key: {how}"
        text = value.decode() if isinstance(value, bytes) else value
        scheme, _, key = text.partition(" ")
        if scheme.lower() != "bearer" or not key:
            return f"the 'authorization' metadata is not 'Bearer <key>': {how}"
        if not any(hmac.compare_digest(key.strip().encode(), k) for k in self._keys):
            return "the API key sent is not one of this server's keys; check the key"
        return None


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails the call with UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def _collect(pieces: Pieces) -> tandem_pb2.GenerateResponse:
    """A streamed completion's pieces joined into one response."""
    response = tandem_pb2.GenerateResponse()
    texts = []
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            texts.append(piece.text)
            response.token_ids.extend(piece.token_ids)
            response.logprobs.extend(piece.logprobs)
            response.id, response.model = piece.id, piece.model
            response.request_id, response.finish_reason = piece.request_id, piece.finish_reason
            if piece.HasField("usage"):
                response.usage.CopyFrom(piece.usage)
    response.text = "".join(texts)
    return response


def _options(params: tandem_pb2.SamplingParams) -> SamplingOptions:
    def given(name: str, default: Any) -> Any:
        return getattr(params, name) if params.HasField(name) else default

    return SamplingOptions(
        max_tokens=given("max_tokens", 16),
        temperature=given("temperature", 1.0),
        top_p=given("top_p", 1.0),
        top_k=params.top_k,
        seed=given("seed", None),
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        stop=tuple(params.stop),
        stop_token_ids=tuple(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
    )


def _checked_logprobs(num_top: int) -> int:
    if num_top > MAX_LOGPROBS:
        raise InvalidRequestError(
            f"invalid 'logprobs': must be in [0, {MAX_LOGPROBS}], got {num_top}", param="logprobs"
        )
    return num_top


def _template_message(message: tandem_pb2.ChatMessage) -> dict[str, str]:
    """The message as chat templates expect it."""
    if not message.role:
        raise InvalidRequestError("every message needs a role, e.g. 'user'", param="messages")
    fields = {"role": message.role, "content": message.content}
    if message.name:
        fields["name"] = message.name
    return fields


def _logprob(entry: worker_pb2.TokenLogprob) -> tandem_pb2.TokenLogprob:
    return tandem_pb2.TokenLogprob(
        token_id=entry.token_id,
        logprob=entry.logprob,
        rank=max(entry.rank, 0),
        top=[tandem_pb2.TopLogprob(token_id=t.token_id, logprob=t.logprob) for t in entry.top],
    )


def _usage(num_prompt_tokens: int, num_completion_tokens: int) -> tandem_pb2.Usage:
    return tandem_pb2.Usage(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=num_completion_tokens,
        total_tokens=num_prompt_tokens + num_completion_tokens,
    )


@contextlib.asynccontextmanager
async def _status_on_error(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """A RouterError ends the RPC with its status code and message. An OverloadedError
    also says, in its message and in the trailing metadata `retry-after`, when to retry."""
    try:
        yield
    except RouterError as e:
        code = next(code for kind, code in STATUS_CODES if isinstance(e, kind))
        trailing: tuple[tuple[str, str], ...]
        message, trailing = str(e), ()
        if isinstance(e, OverloadedError):
            message = f"{message} (retry after {e.retry_after_s:g} s)"
            trailing = (("retry-after", f"{e.retry_after_s:g}"),)
        await context.abort(code, message, trailing_metadata=trailing)
