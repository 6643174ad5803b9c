"""The fused C++ operators compute what the model's torch operators compute: RMSNorm,
the residual add before it, and RoPE on the q and k heads of the fused projection;
bad shapes are refused with the reason."""

from __future__ import annotations

import pytest
import torch

from engine.config import RopeScaling
from engine.kernels import cpu_kernels
from engine.models.llama import RMSNorm
from engine.models.rope import RotaryEmbedding, apply_rope


@pytest.fixture(scope="module", autouse=True)
def _kernels() -> None:
    cpu_kernels.load()


def _norm(dim: int, seed: int) -> RMSNorm:
    norm = RMSNorm(dim, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
    return norm


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # bfloat16: one rounding apart


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 3, 40])
def test_rms_norm_matches_the_torch_module(num_rows, dtype):
    norm = _norm(576, num_rows).to(dtype)
    x = (torch.randn(num_rows, 576) * 3).to(dtype)
    expected = norm(x)
    norm.fused_ops = True
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(norm(x), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 17])
def test_add_rms_norm_updates_the_residual_and_normalizes_the_sum(num_rows, dtype):
    norm = _norm(64, 7).to(dtype)
    residual, x = torch.randn(num_rows, 64).to(dtype), torch.randn(num_rows, 64).to(dtype)
    total = residual + x
    y = torch.ops.tandem.add_rms_norm_(residual, x, norm.weight, norm.eps)
    assert torch.equal(residual, total)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y, norm(total), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(9, 3), (4, 4)])
def test_rope_in_place_matches_apply_rope_and_leaves_v_alone(num_heads, num_kv_heads, dtype):
    head_dim, num_tokens = 64, 11
    rope = RotaryEmbedding(head_dim, 4096, 10000.0, RopeScaling())
    positions = torch.tensor([0, 1, 2, 5, 100, 4095, 7, 7, 3000, 12, 1])
    cos, sin = rope.lookup(positions, dtype)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.clone().split([q_size, kv_size, kv_size], dim=-1)
    q_ref, k_ref = apply_rope(
        q.reshape(num_tokens, num_heads, head_dim),
        k.reshape(num_tokens, num_kv_heads, head_dim),
        cos,
        sin,
    )
    torch.ops.tandem.rope_qkv_(
        qkv, cos.view(num_tokens, head_dim), sin.view(num_tokens, head_dim),
        num_heads, num_kv_heads, head_dim,
    )  # fmt: skip
    q_out, k_out, v_out = qkv.split([q_size, kv_size, kv_size], dim=-1)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(q_out, q_ref.reshape(num_tokens, -1), rtol=tol, atol=tol)
    torch.testing.assert_close(k_out, k_ref.reshape(num_tokens, -1), rtol=tol, atol=tol)
    assert torch.equal(v_out, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1536, 40])  # 40: not a whole number of vectors
def test_silu_mul_matches_silu_of_gate_times_up(width, dtype):
    # gate values from -100 to 100: exp must neither overflow nor lose the sign
    gate = torch.linspace(-100, 100, 7 * width).view(7, width)
    gate_up = torch.cat([gate, torch.randn(7, width) * 2], dim=1).to(dtype)
    g, u = gate_up.float().split(width, dim=1)
    expected = torch.nn.functional.silu(g) * u
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    out = torch.ops.tandem.silu_mul(gate_up)
    assert out.dtype == dtype and out.shape == (7, width)
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_agree_on_many_rows_and_widths_off_the_vector_size(dtype):
    """Rows of 4,096 tokens (split over threads) and a width that is not a multiple of 16
    (the scalar path) both match the module."""
    for rows, dim in [(4096, 576), (33, 24)]:
        norm = _norm(dim, rows).to(dtype)
        x = (torch.randn(rows, dim) * 3).to(dtype)
        expected = norm(x)
        norm.fused_ops = True
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(norm(x), expected, rtol=tol, atol=tol)


# 17: a tail past the whole vectors
@pytest.mark.parametrize("rows, width", [(96, 49152), (5, 17), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_argmax_picks_torch_maxs_index(rows, width, dtype):
    # bfloat16 rows tie often (8 bits of mantissa): the first of the tied is the answer
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(width)).to(dtype)
    assert torch.equal(torch.ops.tandem.row_argmax(x), x.float().max(dim=-1).indices)


def test_row_argmax_takes_the_first_of_equal_maxima_and_the_first_nan():
    x = torch.zeros(3, 40)
    x[0, 7] = x[0, 30] = 1.0  # ties: the first
    x[1, 35] = x[1, 3] = float("nan")  # a NaN is the maximum, as in torch.max
    x[2] = -float("inf")  # nothing above -inf: index 0
    assert torch.ops.tandem.row_argmax(x).tolist() == [7, 3, 0] == x.max(dim=-1).indices.tolist()


def test_bad_shapes_are_refused_with_the_reason():
    weight = torch.ones(8)
    with pytest.raises(RuntimeError, match=r"weight must be Float \[9\], got Float \[8\]"):
        torch.ops.tandem.rms_norm(torch.randn(2, 9), weight, 1e-5)
    with pytest.raises(RuntimeError, match="x must be a contiguous float32 or bfloat16"):
        torch.ops.tandem.rms_norm(torch.randn(2, 8, dtype=torch.float64), weight, 1e-5)
    with pytest.raises(RuntimeError, match="add_rms_norm_: x must be"):
        torch.ops.tandem.add_rms_norm_(torch.randn(2, 8), torch.randn(3, 8), weight, 1e-5)
    with pytest.raises(RuntimeError, match="qkv must be a contiguous float32 or bfloat16"):
        torch.ops.tandem.rope_qkv_(torch.randn(2, 100), torch.ones(2, 4), torch.ones(2, 4), 2, 1, 4)
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        torch.ops.tandem.rope_qkv_(torch.randn(2, 16), torch.ones(3, 4), torch.ones(3, 4), 2, 1, 4)
    with pytest.raises(RuntimeError, match=r"gate_up must be .* \[T, 2I\], got Float \[2, 5\]"):
        torch.ops.tandem.silu_mul(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="row_argmax: x must be a contiguous float32"):
        torch.ops.tandem.row_argmax(torch.randn(2, 5, dtype=torch.float64))


def test_the_fused_engine_gives_the_torch_engines_tokens(model_path, prompts):
    """Greedy tokens from the engine on its C++ operators (quantized linear layers, fused
    norms and RoPE) and on torch's alone, for prompts of 1 to 512 tokens."""
    from tandem import LLM, SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0)
    chosen = [p for p in prompts if len(p) <= 512][::2]
    outputs = {}
    for kernel in ("auto", "torch"):
        llm = LLM(str(model_path), dtype="float32", linear_kernel=kernel, num_blocks=128)
        assert llm.engine.model.fused_ops == (kernel == "auto")
        outputs[kernel] = [o.token_ids for o in llm.generate(chosen, params)]
    assert outputs["auto"] == outputs["torch"]
