"""tandem: disaggregated LLM serving. The public face: `LLM` and `SamplingParams`."""

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

__all__ = [
    "LLM",
    "InvalidRequestError",
    "InvalidSamplingParamsError",
    "ModelNotFoundError",
    "RequestOutput",
    "SamplingParams",
    "TandemError",
    "UnsupportedModelError",
]
