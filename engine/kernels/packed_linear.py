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

On a CPU with AMX tiles (`amx_bf16`: Intel Xeon since Sapphire Rapids), the kernel
multiplies bfloat16 weights on the tiles itself (csrc/packed_linear.cpp reads the pair
layout as TDPBF16PS's B tile, in blocks of 32 rows by 32 columns): a decode step's rows
cost little more than streaming the weights once, and up to 256 rows the kernel runs
1.15-1.5x the rate of torch's oneDNN GEMM (also on the tiles), which is as fast from
about 512 rows and 1.3-1.7x faster from 1,536 (Intel Xeon, SmolLM2's shapes, 2
threads). A bfloat16 `PackedLinear` there keeps the plain weight as well and hands
calls of `matrix_rows` rows or more to `F.linear`, at the price of a second copy of the
weights (the tied lm_head's is the embedding's own). Where the tiles cannot be used by
the kernel (a compiler without AMX), the vector micro-kernel loses to oneDNN from 8 rows.

`pack_linears(model, blocks)` keeps the weights a GGUF file stores block-quantized
(engine.models.gguf_format.BlockWeights: Q4_0, Q4_1, Q8_0) in their blocks, as a
`QuantizedLinear`: 4-bit weights stream from memory at 6 bits instead of 32, and the
kernel dequantizes them exactly, so the outputs equal the float32 kernel's on the
dequantized weights, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from engine.kernels import cpu_kernels
from engine.models.gguf_format import BLOCK, BlockWeights

PANEL = 16  # output columns per panel (csrc/packed_linear.cpp)
# Rows from which F.linear (oneDNN, on AMX tiles) beats the packed kernel, bfloat16, 2
# threads, SmolLM2's shapes: the kernel on the tiles, or on vector registers.
TILE_MATRIX_ROWS = 512
MATRIX_ROWS = 8


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward, computed from a packed copy of its weight (float32 accumulation)."""

    weight: torch.Tensor | None  # the plain weight, for F.linear (a buffer; see __init__)

    def __init__(self, linear: nn.Linear, matrix_unit: bool = False) -> None:
        """`matrix_unit`: also keep the plain weight, for calls of `matrix_rows` rows or
        more (a bfloat16 weight on a CPU with AMX tiles)."""
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        packed = torch.ops.tandem.pack_linear_weight(linear.weight.detach())
        self.register_buffer("packed_weight", packed)  # [ceil(N / 16), K, 16]
        self.register_buffer("weight", linear.weight.detach() if matrix_unit else None)
        self.bias = linear.bias
        self.matrix_rows = TILE_MATRIX_ROWS if torch.ops.tandem.amx_tiles() else MATRIX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, K] -> [T, N]
        if self.weight is not None and x.shape[0] >= self.matrix_rows:
            return nn.functional.linear(x, self.weight, self.bias)
        return torch.ops.tandem.packed_linear(x, self.packed_weight, self.out_features, self.bias)

    def extra_repr(self) -> str:
        tiles = f", F.linear from {self.matrix_rows} rows" if self.weight is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, packed{tiles}"


class QuantizedLinear(nn.Module):
    """`nn.Linear`'s forward from a block-quantized weight, dequantized in the kernel."""

    def __init__(self, blocks: BlockWeights, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = blocks.shape
        self.kind = blocks.kind
        codes, scales = pack_block_weights(blocks)
        self.register_buffer("codes", codes)  # [P, K / 32, 32, 8 or 16]
        self.register_buffer("scales", scales)  # [P, K / 32, 2, 16]: scale, offset
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, K] -> [T, N]
        return torch.ops.tandem.quantized_linear(
            x, self.codes, self.scales, self.out_features, self.bias
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


def pack_block_weights(blocks: BlockWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockWeights -> (codes, scales) in the kernel's panel layout (csrc/packed_linear.cpp):
    rows padded to whole panels with zero weights, 4-bit codes two to a byte."""
    n, k = blocks.shape
    if k % BLOCK:
        raise ValueError(f"block-quantized weights need K a multiple of {BLOCK}, got {k}")
    num_panels, num_blocks = -(-n // PANEL), k // BLOCK
    pad = num_panels * PANEL - n

    def by_panel(a: np.ndarray) -> np.ndarray:  # [N, ...] -> [P, 16, ...], zero rows added
        return np.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(
            num_panels, PANEL, *a.shape[1:]
        )

    scales = np.stack([by_panel(blocks.scale), by_panel(blocks.offset)], axis=2)  # [P, 16, 2, B]
    scales = scales.transpose(0, 3, 2, 1)  # [P, B, 2, 16]
    codes = by_panel(blocks.codes).reshape(num_panels, PANEL, num_blocks, BLOCK)
    codes = codes.transpose(0, 2, 3, 1)  # [P, B, 32, 16]
    if blocks.bits == 4:  # column j in the low nibble, column j + 8 in the high one
        codes = codes[..., : PANEL // 2] | (codes[..., PANEL // 2 :] << 4)
    return (
        torch.from_numpy(np.ascontiguousarray(codes)),
        torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)),
    )


def resolve_linear_kernel(name: str, dtype: torch.dtype = torch.float32) -> str:
    """Resolves "auto" where a compiler can build the C++ kernels: "quantized" in float32
    (4-bit weights read at 6 bits, dequantized exactly), "packed" in bfloat16 (the weights
    in bfloat16, multiplied with AVX512_BF16 where the CPU has it, as fast as the
    quantized ones to read and without their dequantizing); else "torch"."""
    if name != "auto":
        return name
    if not cpu_kernels.compiler_available():
        return "torch"
    return "quantized" if dtype == torch.float32 else "packed"


def pack_linears(model: nn.Module, blocks: Mapping[str, BlockWeights] | None = None) -> int:
    """Replaces every `nn.Linear` in `model` with a `QuantizedLinear` where `blocks` has
    its weight (by module name), else a `PackedLinear`; returns how many.

    A weight tied to another module (the lm_head to the embedding) is packed as a
    copy; the embedding keeps the original for its row lookups. bfloat16 weights on a CPU
    with AMX tiles keep their plain copy as well (see the module's docstring).
    """
    cpu_kernels.load()
    blocks = blocks or {}
    tiles = cpu_kernels.cpu_has("amx_bf16")
    targets = [
        (f"{prefix}.{name}".lstrip("."), parent, name, child)
        for prefix, parent in model.named_modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for path, parent, name, child in targets:
        if path in blocks:
            if blocks[path].shape != tuple(child.weight.shape):
                raise ValueError(
                    f"{path}: quantized weight {blocks[path].shape} is not the layer's "
                    f"{tuple(child.weight.shape)}"
                )
            setattr(parent, name, QuantizedLinear(blocks[path], child.bias))
        else:
            matrix_unit = tiles and child.weight.dtype == torch.bfloat16
            setattr(parent, name, PackedLinear(child, matrix_unit))
    return len(targets)
