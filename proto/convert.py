"""Conversions between the wire messages and plain Python values (no engine types here).

Workers build engine objects from these dicts (`SamplingParams(**params_to_dict(pb))`);
the router builds messages from request fields with `params_from_dict`.
"""

from __future__ import annotations

from typing import Any

from proto.tandem.internal.v1 import worker_pb2 as pb


def params_to_dict(params: pb.SamplingParams) -> dict[str, Any]:
    out: dict[str, Any] = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "logit_bias": dict(params.logit_bias),
        "stop": tuple(params.stop),
        "stop_token_ids": tuple(params.stop_token_ids),
        "ignore_eos": params.ignore_eos,
    }
    if params.HasField("seed"):
        out["seed"] = params.seed
    if params.HasField("logprobs"):
        out["logprobs"] = params.logprobs
    return out


def params_from_dict(values: dict[str, Any]) -> pb.SamplingParams:
    """A SamplingParams message; keys left out take the engine's defaults."""
    defaults: dict[str, Any] = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0}
    fields = {**defaults, **{k: v for k, v in values.items() if v is not None}}
    return pb.SamplingParams(**fields)


def token_logprobs(entries: list[Any]) -> list[pb.TokenLogprob]:
    """From objects with token_id, logprob, rank and top [(token_id, logprob)]."""
    return [
        pb.TokenLogprob(
            token_id=e.token_id,
            logprob=e.logprob,
            rank=e.rank,
            top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in e.top],
        )
        for e in entries
    ]
