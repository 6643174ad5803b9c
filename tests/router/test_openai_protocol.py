"""Streamed chunks written from byte templates are the chunks' JSON, byte for byte."""

from __future__ import annotations

import orjson
import pytest

from proto.tandem.internal.v1 import worker_pb2
from router.openai_protocol import CompletionRequest, ResponseFormat


def response_format(kind: str, **body: object) -> ResponseFormat:
    request = CompletionRequest.model_validate({"prompt": "hi", **body})
    return ResponseFormat.for_request(kind, "tiny@0", "id-1", [[1, 2]], request, False, str)


@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("text", ["", " the", 'a "quoted"\n\\ line', "é 猫 \u2028 \x00"])
@pytest.mark.parametrize("finish_reason", ["", "stop", "length"])
def test_chunk_json_is_the_chunk_as_json(kind, first, text, finish_reason) -> None:
    response = response_format(kind, n=2)
    delta = worker_pb2.TokenDelta(
        request_id="r", index=3, token_ids=[5], text=text, finish_reason=finish_reason
    )
    assert response.chunk_json(1, delta, first) == orjson.dumps(response.chunk(1, delta, first))


def test_chunk_json_with_token_ids_is_the_chunk_as_json() -> None:
    response = response_format("completion", return_token_ids=True)
    delta = worker_pb2.TokenDelta(request_id="r", index=0, token_ids=[5, 6], text=" a b")
    assert response.chunk_json(0, delta, True) == orjson.dumps(response.chunk(0, delta, True))
