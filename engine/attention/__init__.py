"""Attention backends, registered by name; "auto" picks the fastest that can run here."""

from __future__ import annotations

import logging

from engine.attention.base import AttentionBackend, AttentionBatch, BoundAttention
from engine.attention.cpu_backend import CpuAttention
from engine.attention.torch_backend import TorchAttention
from engine.kernels import cpu_kernels

logger = logging.getLogger(__name__)

_BACKENDS: dict[str, type[AttentionBackend]] = {
    TorchAttention.name: TorchAttention,
    CpuAttention.name: CpuAttention,
}


def resolve_backend_name(name: str) -> str:
    """Resolves "auto": the C++ CPU kernels where a compiler can build them, else plain torch."""
    if name != "auto":
        return name
    if cpu_kernels.compiler_available():
        return CpuAttention.name
    logger.warning(
        "no C++ compiler found: attention runs on the slower torch backend "
        "(install g++ for tandem's CPU kernels)"
    )
    return TorchAttention.name


def get_backend(name: str) -> type[AttentionBackend]:
    name = resolve_backend_name(name)
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(sorted(_BACKENDS))}"
        )
    return _BACKENDS[name]


__all__ = ["AttentionBackend", "AttentionBatch", "BoundAttention", "get_backend"]
