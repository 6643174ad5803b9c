"""Configuration of one engine instance: the model's shape and the engine's knobs.

Both are frozen. Resolving "auto" values (the number of KV blocks, thread counts)
returns a new config through `dataclasses.replace`, never mutates one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SUPPORTED_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *sorted(SUPPORTED_DTYPES))
# CPU flags with bfloat16 arithmetic in hardware. Without them, bfloat16 is converted in
# software at every matmul: prefill then runs about 11x slower than float32 (AVX2 EPYC).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_dtype(dtype: str, cpuinfo: str | None = None) -> str:
    """`dtype`, with "auto" made bfloat16 where the CPU computes in it (`cpuinfo`: the
    text of /proc/cpuinfo, read when None), else float32."""
    if dtype != "auto":
        return dtype
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as file:
                cpuinfo = file.read()
        except OSError:  # not Linux: no flags to read
            cpuinfo = ""
    flags = set(cpuinfo.split())
    return "bfloat16" if any(flag in flags for flag in BF16_CPU_FLAGS) else "float32"


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is one of `ROPE_KINDS`."""

    kind: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None


ROPE_KINDS = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    output_bias: bool = False  # o_proj carries a bias (Llama with attention_bias)
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()


# "quantized": the C++ kernel, weights a GGUF file stores block-quantized kept in their
# blocks (the rest as "packed"); "packed": the C++ kernel on float weights; "torch": nn.Linear.
LINEAR_KERNELS = ("auto", "quantized", "packed", "torch")


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of one engine instance.

    `num_blocks=None` means: size the KV cache from `kv_cache_memory_bytes`.
    `max_model_len=None` means: the model's context length (capped by a sliding window).
    """

    model: str | None = None
    dtype: str = "bfloat16"
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_bytes: int = 1 << 30
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 256
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # "cpu" (C++ kernels) where they build, else "torch"
    linear_kernel: str = "auto"  # "quantized" (C++ kernel) where it builds, else "torch"
    num_threads: int | None = None
    seed: int = 0
    # Tensor parallelism (engine/parallel.py): this many processes share the model, by
    # heads, on one machine; their collectives talk over `tp_host`. The driver (rank 0)
    # sets the other two for the shards it starts.
    tensor_parallel_size: int = 1
    tp_host: str = "127.0.0.1"
    tp_store_address: str = ""
    tp_group_id: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(SUPPORTED_DTYPES)}, got {self.dtype!r}")
        positive = ("block_size", "max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.linear_kernel not in LINEAR_KERNELS:
            raise ValueError(
                f"linear_kernel must be one of {list(LINEAR_KERNELS)}, got {self.linear_kernel!r}"
            )
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return SUPPORTED_DTYPES[self.dtype]
