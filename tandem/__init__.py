"""tandem: disaggregated LLM serving. The public face: `LLM` and `SamplingParams` for
offline generation, `Client` and `AsyncClient` for a running router.

The client side imports no engine code (no torch): `LLM`, `SamplingParams` and the
engine's types are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tandem.client import (
    AsyncClient,
    Client,
    Completion,
    CompletionChunk,
    InvalidRequest,
    Model,
    NotFound,
    Overloaded,
    ServerError,
    TandemClientError,
    Timeout,
    Unauthenticated,
    Unavailable,
    Usage,
)

if TYPE_CHECKING:
    from engine.errors import (
        InvalidRequestError,
        InvalidSamplingParamsError,
        ModelNotFoundError,
        TandemError,
        UnsupportedModelError,
    )
    from engine.outputs import RequestOutput
    from engine.sampling_params import SamplingParams
    from tandem.llm import LLM

# name -> the module it comes from, imported on first use (they import torch)
_LAZY = {
    "LLM": "tandem.llm",
    "RequestOutput": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
    "InvalidRequestError": "engine.errors",
    "InvalidSamplingParamsError": "engine.errors",
    "ModelNotFoundError": "engine.errors",
    "TandemError": "engine.errors",
    "UnsupportedModelError": "engine.errors",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tandem' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "LLM",
    "AsyncClient",
    "Client",
    "Completion",
    "CompletionChunk",
    "InvalidRequest",
    "InvalidRequestError",
    "InvalidSamplingParamsError",
    "Model",
    "ModelNotFoundError",
    "NotFound",
    "Overloaded",
    "RequestOutput",
    "SamplingParams",
    "ServerError",
    "TandemClientError",
    "TandemError",
    "Timeout",
    "Unauthenticated",
    "Unavailable",
    "UnsupportedModelError",
    "Usage",
]
