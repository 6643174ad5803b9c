"""Linear layers run by tandem's C++ kernel from weights packed once at load time.

`pack_linears(model)` swaps every `nn.Linear` of a loaded model for a
`PackedLinear` holding the same weight re-laid in panels of 16 output columns
(csrc/packed_linear.cpp has the layout). The model's code is unchanged: this is
a transform applied after loading, like a quantization pass.

Why: torch's CPU wheels compute `nn.Linear` with MKL, whose small-batch GEMMs
(a decode step: 1-32 rows against 576- or 1536-wide weights) ran at a third to a
tenth of the machine's memory bandwidth on the AMD EPYC this was measured on;
the packed kernel streams each weight once per call whatever the batch, and
also wins on prefill-sized batches there (benchmarks/engine_bench.py).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels import cpu_kernels


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward, computed from a packed copy of its weight (float32 accumulation)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        packed = torch.ops.tandem.pack_linear_weight(linear.weight.detach())
        self.register_buffer("packed_weight", packed)  # [ceil(N / 16), K, 16]
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, K] -> [T, N]
        return torch.ops.tandem.packed_linear(x, self.packed_weight, self.out_features, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def resolve_linear_kernel(name: str) -> str:
    """Resolves "auto": "packed" where a compiler can build the C++ kernels, else "torch"."""
    if name != "auto":
        return name
    return "packed" if cpu_kernels.compiler_available() else "torch"


def pack_linears(model: nn.Module) -> int:
    """Replaces every `nn.Linear` in `model` with a `PackedLinear`; returns how many.

    A weight tied to another module (the lm_head to the embedding) is packed as a
    copy; the embedding keeps the original for its row lookups.
    """
    cpu_kernels.load()
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)
