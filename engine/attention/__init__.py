"""Attention backends, registered by name."""

from __future__ import annotations

from engine.attention.base import AttentionBackend, AttentionBatch, BoundAttention
from engine.attention.torch_backend import TorchAttention

_BACKENDS: dict[str, type[AttentionBackend]] = {TorchAttention.name: TorchAttention}


def get_backend(name: str) -> type[AttentionBackend]:
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(sorted(_BACKENDS))}"
        )
    return _BACKENDS[name]


__all__ = ["AttentionBackend", "AttentionBatch", "BoundAttention", "get_backend"]
