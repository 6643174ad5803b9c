"""The C++ decode-attention kernel agrees with the torch backend on every shape family
served, and the torch backend (the fallback) still gives transformers' greedy tokens."""

from __future__ import annotations

import pytest
import torch

from engine.attention import get_backend
from engine.attention.base import AttentionBatch
from engine.attention.cpu_backend import CpuAttention
from engine.attention.torch_backend import TorchAttention
from tandem import LLM, SamplingParams
from tests.conftest import NUM_REFERENCE_TOKENS


def _decode_batch(context_lens: list[int], block_size: int, num_blocks: int, seed: int):
    """Each request's blocks drawn at random from the pool, as after a long-running server."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables, used = [], 0
    for length in context_lens:
        count = (length + block_size - 1) // block_size
        tables.append(order[used : used + count])
        used += count
    return AttentionBatch(
        query_lens=[1] * len(context_lens),
        context_lens=context_lens,
        block_tables=tables,
        block_size=block_size,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size",
    # Query heads per KV head 1-4: the AVX-512 walk weighs values for up to 4 rows of 64
    # (2 of 128) at once, and a remainder of 3, 2 or 1 rows on its own.
    [(9, 3, 64, 16), (8, 8, 128, 16), (4, 1, 80, 8), (2, 2, 64, 32), (8, 2, 64, 16),
     (6, 3, 64, 16), (8, 4, 128, 16), (12, 2, 128, 16)],
)  # fmt: skip
def test_kernel_matches_torch_backend(dtype, num_heads, num_kv_heads, head_dim, block_size):
    # Lengths hit one token, exact block ends, one past a block end, and long contexts.
    context_lens = [1, block_size, block_size + 1, 3 * block_size - 1, 257, 1000]
    num_blocks = 200
    batch = _decode_batch(context_lens, block_size, num_blocks, seed=head_dim)
    generator = torch.Generator().manual_seed(0)
    shape = TorchAttention.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
    cache = torch.randn(shape, generator=generator).to(dtype)
    num_tokens = len(context_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=generator).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(dtype)
    outputs = []
    for backend_cls in (TorchAttention, CpuAttention):
        backend = backend_cls(num_heads, num_kv_heads, head_dim)
        layer = cache.clone()
        outputs.append(backend.forward(q, k, v, layer, backend.plan(batch)).float())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outputs[1], outputs[0], atol=tolerance, rtol=tolerance)


def test_auto_picks_the_kernel_where_a_compiler_exists():
    assert get_backend("auto") is CpuAttention
    with pytest.raises(ValueError, match="available: cpu, torch"):
        get_backend("flash")


def test_engine_on_the_torch_backend_matches_transformers(model_path, prompts, reference_outputs):
    # The default ("auto" = cpu) backend is checked the same way in test_correctness.py.
    llm = LLM(
        str(model_path), dtype="float32", max_num_batched_tokens=512, attention_backend="torch"
    )
    chosen = range(1, len(prompts), 2)  # every other length, 2 to 1,500 tokens
    params = SamplingParams(max_tokens=NUM_REFERENCE_TOKENS, temperature=0)
    outputs = llm.generate([prompts[i] for i in chosen], params)
    assert llm.engine.backend.name == "torch"
    for i, out in zip(chosen, outputs, strict=True):
        assert out.token_ids == reference_outputs[i], f"prompt {i} ({len(prompts[i])} tokens)"
