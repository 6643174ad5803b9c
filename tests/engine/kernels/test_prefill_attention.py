"""The bfloat16 prefill attention kernel (CPUs with AVX512_BF16) computes causal
grouped-query attention as SDPA does, with and without earlier context; bad inputs are
refused with the reason; the engine's bfloat16 prefill on it predicts what the torch
backend's does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import cpu_kernels


def _has_bf16_pairs() -> bool:
    try:
        cpu_kernels.load()
    except cpu_kernels.KernelBuildError:
        return False
    return bool(torch.ops.tandem.bf16_pairs())


pytestmark = pytest.mark.skipif(
    not _has_bf16_pairs(), reason="the kernels do not build here, or the CPU has no AVX512_BF16"
)


def _reference(q, keys, values, scale):
    """SDPA in float32 on the same bfloat16 inputs: query i sits at C - n + i."""
    n, C = q.shape[0], keys.shape[0]
    mask = torch.arange(C)[None, :] <= torch.arange(C - n, C)[:, None]
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1)[None], keys.float().transpose(0, 1)[None],
        values.float().transpose(0, 1)[None], attn_mask=mask, scale=scale, enable_gqa=True,
    )  # fmt: skip
    return out[0].transpose(0, 1)


# (n, C): a chunk alone (C = n), chunks after earlier context, sizes that leave partial
# query tiles (32) and partial key panels (16), an odd C, one query.
@pytest.mark.parametrize(
    "n,C", [(1, 1), (5, 5), (37, 37), (200, 200), (64, 100), (33, 701), (1, 50)]
)
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 64), (8, 2, 128)])
def test_matches_sdpa(n, C, heads, kv_heads, dim):
    generator = torch.Generator().manual_seed(n * 1000 + C)
    q = torch.randn(n, heads, dim, generator=generator).to(torch.bfloat16)
    keys = torch.randn(C, kv_heads, dim, generator=generator).to(torch.bfloat16)
    values = torch.randn(C, kv_heads, dim, generator=generator).to(torch.bfloat16)
    scale = dim**-0.5
    out = torch.ops.tandem.prefill_attention(q, keys, values, scale)
    assert out.shape == (n, heads, dim) and out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), _reference(q, keys, values, scale), rtol=2e-2, atol=2e-2
    )


def test_strided_inputs_are_read_as_their_values():
    qkv = torch.randn(20, 9 * 64 + 2 * 3 * 64).to(torch.bfloat16)  # the fused projection's
    q = qkv[:, : 9 * 64].view(20, 9, 64)
    k = qkv[:, 9 * 64 : 12 * 64].view(20, 3, 64)
    v = qkv[:, 12 * 64 :].view(20, 3, 64)
    out = torch.ops.tandem.prefill_attention(q, k, v, 0.125)
    expected = torch.ops.tandem.prefill_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), 0.125
    )
    assert torch.equal(out, expected)


def test_bad_inputs_are_refused_with_the_reason():
    q = torch.randn(4, 9, 64).to(torch.bfloat16)
    kv = torch.randn(4, 3, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        torch.ops.tandem.prefill_attention(q.float(), kv, kv, 0.125)
    with pytest.raises(RuntimeError, match="4 queries but only 3 keys"):
        torch.ops.tandem.prefill_attention(q, kv[:3], kv[:3], 0.125)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        torch.ops.tandem.prefill_attention(q, kv[:, :2], kv[:, :2], 0.125)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.tandem.prefill_attention(q[..., :40], kv[..., :40], kv[..., :40], 0.125)


def test_the_engine_predicts_what_the_torch_backend_predicts(model_path, prompts):
    """bfloat16 prefills of 100-1,100 tokens, in one step and in 128-token chunks (each
    chunk after its earlier context), on the cpu backend and the torch backend: the same
    next token, and log-probabilities a bfloat16 rounding apart."""
    from tandem import LLM, SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    chosen = [p for p in prompts if 100 <= len(p) <= 1100][::2]
    results = {}
    for backend, chunk in (("cpu", 2048), ("cpu", 128), ("torch", 2048)):
        llm = LLM(
            str(model_path), dtype="bfloat16", attention_backend=backend,
            max_num_batched_tokens=chunk, enable_prefix_caching=False,
        )  # fmt: skip
        results[(backend, chunk)] = [o.logprobs[0] for o in llm.generate(chosen, params)]
    for got in (results[("cpu", 2048)], results[("cpu", 128)]):
        for ours, theirs in zip(got, results[("torch", 2048)], strict=True):
            assert ours.token_id == theirs.token_id
            assert abs(ours.logprob - theirs.logprob) < 0.15
