"""Block-quantized weights (GGUF Q4_0, Q4_1, Q8_0) kept in their blocks: decoded as the
gguf library dequantizes them, computed bit for bit as the float32 kernel computes the
dequantized weight, and, in the engine, the same logits as the float32 packed kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from engine.kernels import cpu_kernels
from engine.kernels.packed_linear import QuantizedLinear, pack_block_weights
from engine.models.gguf_format import GGUFModel, _decode_blocks

KINDS = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0]


@pytest.fixture(scope="module", autouse=True)
def _kernels() -> None:
    cpu_kernels.load()


def _quantized(kind: GGMLQuantizationType, n: int, k: int, seed: int):
    """A random [n, k] weight, quantized by the gguf library: (its raw rows, its blocks)."""
    weight = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    rows = quantize(weight, kind)
    blocks = _decode_blocks(kind, rows)
    assert blocks is not None
    return rows, blocks


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_blocks_decode_to_what_gguf_dequantizes(kind):
    rows, blocks = _quantized(kind, 48, 96, seed=kind.value)
    expected = dequantize(rows, kind)
    assert blocks.shape == (48, 96)
    np.testing.assert_array_equal(blocks.dequantize(), expected)
    # and the kernel's own dequantization of its panel layout gives the same floats
    codes, scales = pack_block_weights(blocks)
    got = torch.ops.tandem.dequantize_linear_weight(codes, scales, 48)
    assert torch.equal(got, torch.from_numpy(expected))


# Rows: 1-6 are each micro-kernel width, 7 and 13 a full width and a remainder. N = 33
# leaves a panel mostly padding; K = 32 is a single block.
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("num_rows", [1, 2, 5, 7, 13, 64])
@pytest.mark.parametrize("out_features,in_features", [(33, 32), (96, 576)])
def test_equals_the_float32_kernel_on_the_dequantized_weight(
    kind, num_rows, out_features, in_features
):
    _, blocks = _quantized(kind, out_features, in_features, seed=num_rows)
    codes, scales = pack_block_weights(blocks)
    weight = torch.from_numpy(blocks.dequantize())
    packed = torch.ops.tandem.pack_linear_weight(weight)
    generator = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    for b in (None, bias):
        y = torch.ops.tandem.quantized_linear(x, codes, scales, out_features, b)
        assert torch.equal(y, torch.ops.tandem.packed_linear(x, packed, out_features, b))
        torch.testing.assert_close(
            y, torch.nn.functional.linear(x, weight, b), rtol=1e-4, atol=1e-4
        )


def test_bfloat16_activations_come_back_in_bfloat16():
    _, blocks = _quantized(GGMLQuantizationType.Q4_1, 40, 64, seed=3)
    layer = QuantizedLinear(blocks, bias=None)
    x = torch.randn(3, 64).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 40)
    expected = torch.nn.functional.linear(x.float(), torch.from_numpy(blocks.dequantize()))
    torch.testing.assert_close(y, expected.to(torch.bfloat16), rtol=0, atol=0.125)


def test_no_rows_and_mismatched_inputs():
    _, blocks = _quantized(GGMLQuantizationType.Q4_1, 32, 64, seed=0)
    codes, scales = pack_block_weights(blocks)
    assert torch.ops.tandem.quantized_linear(torch.empty(0, 64), codes, scales, 32, None).shape == (
        0,
        32,
    )
    with pytest.raises(RuntimeError, match="x has K = 65 but the weight 64"):
        torch.ops.tandem.quantized_linear(torch.randn(2, 65), codes, scales, 32, None)
    with pytest.raises(RuntimeError, match="N = 40 does not match"):
        torch.ops.tandem.quantized_linear(torch.randn(2, 64), codes, scales, 40, None)
    with pytest.raises(RuntimeError, match="codes must be uint8"):
        torch.ops.tandem.quantized_linear(torch.randn(2, 64), codes.float(), scales, 32, None)
    with pytest.raises(RuntimeError, match="scales must be float32"):
        torch.ops.tandem.quantized_linear(torch.randn(2, 64), codes, scales[:, :1], 32, None)


def test_the_default_models_blocks_are_its_weights(model_path):
    """Every block-quantized tensor of the default GGUF, q/k rows un-permuted as the
    float weights are, dequantizes to exactly the float weight the engine loads."""
    model = GGUFModel(model_path)
    blocks = model.block_weights()
    assert {b.kind for b in blocks.values()} == {"Q4_1", "Q8_0"}
    floats = dict(model.tensors())
    for name, block in blocks.items():
        assert np.array_equal(block.dequantize(), floats[name].numpy()), name


def test_the_engine_runs_the_default_model_from_its_blocks_with_the_same_logprobs(model_path):
    from tandem import LLM, SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3)
    prompts = [[1, 504, 3458, 282, 1083, 30], list(range(300, 340))]
    results = {}
    for kernel in ("quantized", "packed"):
        llm = LLM(str(model_path), dtype="float32", linear_kernel=kernel, num_blocks=64)
        layers = [m for m in llm.engine.model.modules() if isinstance(m, QuantizedLinear)]
        # per layer: qkv, o, gate_up, down; and the head, from the tied Q8_0 embedding
        assert len(layers) == (4 * 30 + 1 if kernel == "quantized" else 0)
        results[kernel] = [(o.token_ids, o.logprobs) for o in llm.generate(prompts, params)]
    assert results["quantized"] == results["packed"]
