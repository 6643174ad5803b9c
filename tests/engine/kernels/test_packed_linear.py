"""The packed C++ linear kernel computes nn.Linear: every batch size the micro-kernel
splits differently, weights whose rows do not fill a panel, biases, both dtypes; and a
model whose linears are packed gives the same logits as the plain one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import cpu_kernels
from engine.kernels.packed_linear import (
    MATRIX_ROWS,
    TILE_MATRIX_ROWS,
    PackedLinear,
    pack_linears,
    resolve_linear_kernel,
)


@pytest.fixture(scope="module", autouse=True)
def _kernels() -> None:
    cpu_kernels.load()


# Rows: 1-6 are each micro-kernel width alone, 7 and 13 a full width plus a remainder,
# 64 many full widths. K = 7 leaves a remainder in the interleaved k loop of every width.
@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 5, 6, 7, 13, 64])
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (7, 16), (1536, 33)])
def test_matches_f_linear_in_float32(num_rows, in_features, out_features):
    generator = torch.Generator().manual_seed(num_rows * 1000 + out_features)
    x = torch.randn(num_rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    packed = torch.ops.tandem.pack_linear_weight(weight)
    assert packed.shape == ((out_features + 15) // 16, in_features, 16)
    for b in (None, bias):
        y = torch.ops.tandem.packed_linear(x, packed, out_features, b)
        torch.testing.assert_close(y, F.linear(x, weight, b), rtol=1e-4, atol=1e-4)


# On a CPU with AVX512_BF16, bfloat16 weights with an even K take the pair layout, whose
# micro-kernel is 8 rows wide (8, 13 = 8 + 5, 64); K = 7 keeps the widening layout.
@pytest.mark.parametrize("num_rows", [1, 4, 8, 9, 13, 64])
@pytest.mark.parametrize("in_features", [576, 7])
def test_bfloat16_weights_accumulate_in_float32(num_rows, in_features):
    generator = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, in_features, generator=generator).to(torch.bfloat16)
    weight = torch.randn(100, in_features, generator=generator).to(torch.bfloat16)
    packed = torch.ops.tandem.pack_linear_weight(weight)
    if in_features % 2:
        assert packed.shape == (7, in_features, 16)
    y = torch.ops.tandem.packed_linear(x, packed, 100, None)
    assert y.dtype == torch.bfloat16
    # The exact float32 product of the bfloat16 inputs, rounded once to bfloat16.
    expected = F.linear(x.float(), weight.float()).to(torch.bfloat16)
    torch.testing.assert_close(y, expected, rtol=0, atol=0.125)


def test_no_rows_gives_an_empty_result():
    weight = torch.randn(32, 8)
    y = torch.ops.tandem.packed_linear(
        torch.empty(0, 8), torch.ops.tandem.pack_linear_weight(weight), 32, None
    )
    assert y.shape == (0, 32)


def test_mismatched_inputs_are_refused_with_the_reason():
    packed = torch.ops.tandem.pack_linear_weight(torch.randn(32, 8))
    with pytest.raises(RuntimeError, match="x has K = 9 but the weight 8"):
        torch.ops.tandem.packed_linear(torch.randn(2, 9), packed, 32, None)
    with pytest.raises(RuntimeError, match="N = 40 does not match"):
        torch.ops.tandem.packed_linear(torch.randn(2, 8), packed, 40, None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 weights only"):
        torch.ops.tandem.pack_linear_weight(torch.randn(4, 4, dtype=torch.float64))


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 24)
        self.hidden = nn.Linear(24, 40, bias=True)
        self.head = nn.Linear(24, 50, bias=False)
        self.head.weight = self.embed.weight  # tied, as SmolLM2's lm_head is

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.head(x) + self.hidden(x).sum(-1, keepdim=True)


def test_pack_linears_swaps_every_linear_and_keeps_the_outputs():
    torch.manual_seed(0)
    model = _TwoLayers().eval()
    ids = torch.tensor([1, 7, 49, 3])
    with torch.inference_mode():
        expected = model(ids)
        assert pack_linears(model) == 2
        assert isinstance(model.hidden, PackedLinear) and isinstance(model.head, PackedLinear)
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
    # The embedding keeps the tied weight for its lookups.
    assert isinstance(model.embed.weight, nn.Parameter) and model.embed.weight.shape == (50, 24)


@pytest.mark.parametrize("num_rows", [1, 15, 16, 17, MATRIX_ROWS, TILE_MATRIX_ROWS + 5])
def test_a_bfloat16_layer_for_amx_tiles_gives_f_linear_at_every_row_count(num_rows):
    # Below matrix_rows the packed kernel runs (on AMX tiles where it can: 16 rows a
    # tile, the last one padded), from there F.linear on the plain copy: both are
    # nn.Linear's result (the packed kernel rounds once, as above).
    generator = torch.Generator().manual_seed(num_rows)
    linear = nn.Linear(576, 100).to(torch.bfloat16)
    layer = PackedLinear(linear, matrix_unit=True)
    assert layer.matrix_rows in (MATRIX_ROWS, TILE_MATRIX_ROWS)
    x = torch.randn(num_rows, 576, generator=generator).to(torch.bfloat16)
    with torch.inference_mode():
        y = layer(x)
    expected = F.linear(x.float(), linear.weight.float(), linear.bias.float()).to(torch.bfloat16)
    torch.testing.assert_close(y, expected, rtol=0.02, atol=0.125)
    assert layer.weight is not None and layer.weight.data_ptr() == linear.weight.data_ptr()


def test_pack_linears_keeps_the_plain_weight_only_for_bfloat16_on_amx(monkeypatch):
    model = _TwoLayers().eval()
    monkeypatch.setattr(cpu_kernels, "cpu_has", lambda flag: flag == "amx_bf16")
    pack_linears(model)
    assert model.hidden.weight is None  # float32: the packed kernel only
    model = _TwoLayers().to(torch.bfloat16).eval()
    pack_linears(model)
    assert model.hidden.weight is not None and model.head.weight is not None
    # The tied lm_head's plain copy is the embedding's weight itself, not a second one.
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()
    monkeypatch.setattr(cpu_kernels, "cpu_has", lambda flag: False)
    model = _TwoLayers().to(torch.bfloat16).eval()
    pack_linears(model)
    assert model.hidden.weight is None


def test_auto_resolves_to_the_quantized_kernel_where_it_builds():
    assert resolve_linear_kernel("auto", torch.float32) == "quantized"
    assert resolve_linear_kernel("auto", torch.bfloat16) == "packed"
    assert resolve_linear_kernel("torch") == "torch"
