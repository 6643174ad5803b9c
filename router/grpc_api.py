"""The router's public gRPC API: the `tandem.v1.Tandem` service (proto/tandem/v1).

Generate and GenerateStream run on the same Router as the HTTP API. A client that
cancels its call ends the request on the workers: grpc.aio cancels the handler, and
Router.generate sends Abort as its generator closes. Router errors map to status
codes (see router/errors.py). More RPCs (Abort, ListModels), health and reflection
are added next to these with `add_to_server`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc

from proto.tandem.internal.v1 import worker_pb2
from proto.tandem.v1 import tandem_pb2, tandem_pb2_grpc
from router.core import Router
from router.errors import (
    GenerationError,
    InvalidRequestError,
    ModelNotFoundError,
    NoInstanceError,
    RouterError,
)
from router.frontend import (
    SamplingOptions,
    check_delta,
    check_model,
    collect,
    prompt_token_ids,
)

Deltas = AsyncGenerator[worker_pb2.TokenDelta, None]

STATUS_CODES: list[tuple[type[RouterError], grpc.StatusCode]] = [
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (NoInstanceError, grpc.StatusCode.UNAVAILABLE),
    (GenerationError, grpc.StatusCode.INTERNAL),
    (RouterError, grpc.StatusCode.INTERNAL),
]


class TandemService(tandem_pb2_grpc.TandemServicer):
    def __init__(self, router: Router) -> None:
        self._router = router

    async def Generate(
        self, request: tandem_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> tandem_pb2.GenerateResponse:
        async with _status_on_error(context):
            prompt_ids, deltas = self._start(request)
            completion = await collect(deltas)
        return tandem_pb2.GenerateResponse(
            id=completion.request_id,
            model=self._router.model_id,
            text=completion.text,
            token_ids=completion.token_ids,
            finish_reason=completion.finish_reason,
            usage=_usage(len(prompt_ids), len(completion.token_ids)),
        )

    async def GenerateStream(
        self, request: tandem_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tandem_pb2.GenerateStreamResponse]:
        async with _status_on_error(context):
            prompt_ids, deltas = self._start(request)
            num_tokens = 0
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    check_delta(delta)
                    num_tokens += len(delta.token_ids)
                    usage = _usage(len(prompt_ids), num_tokens) if delta.finished else None
                    yield tandem_pb2.GenerateStreamResponse(
                        id=delta.request_id,
                        model=self._router.model_id,
                        index=delta.index,
                        text=delta.text,
                        token_ids=delta.token_ids,
                        finish_reason=delta.finish_reason,
                        usage=usage,
                    )

    def _start(self, request: tandem_pb2.GenerateRequest) -> tuple[list[int], Deltas]:
        """The prompt's token ids and the request's deltas (sent to the workers on the
        first step)."""
        check_model(self._router, request.model)
        if request.prompt and request.prompt_token_ids:
            raise InvalidRequestError(
                "send the prompt as text or as token ids, not both", param="prompt"
            )
        prompt = request.prompt or request.prompt_token_ids
        prompt_ids = prompt_token_ids(self._router, prompt)
        params = _options(request.params).to_params(len(prompt_ids), self._router)
        return prompt_ids, self._router.generate(prompt_ids, params)


def add_to_server(router: Router, server: grpc.aio.Server) -> None:
    tandem_pb2_grpc.add_TandemServicer_to_server(TandemService(router), server)


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


def _usage(num_prompt_tokens: int, num_completion_tokens: int) -> tandem_pb2.Usage:
    return tandem_pb2.Usage(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=num_completion_tokens,
        total_tokens=num_prompt_tokens + num_completion_tokens,
    )


@contextlib.asynccontextmanager
async def _status_on_error(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """A RouterError ends the RPC with its status code and message."""
    try:
        yield
    except RouterError as e:
        code = next(code for kind, code in STATUS_CODES if isinstance(e, kind))
        await context.abort(code, str(e))
