"""Reading a GGUF file: metadata into ModelConfig, tensors (dequantized) into HF names,
and the block-quantized ones (Q4_0, Q4_1, Q8_0) also as their blocks, for the
linear kernel that dequantizes them itself (engine.kernels.packed_linear)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from engine.config import ModelConfig, RopeScaling
from engine.errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

_GLOBAL_NAMES = {
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
BLOCK = 32  # weights per quantization block in the formats below


@dataclass(frozen=True)
class BlockWeights:
    """A [N, K] weight as blocks of 32 along K: w[n, k] = scale[n, k // 32] * codes[n, k]
    + offset[n, k // 32], in float32 with one rounding, exactly what gguf's dequantize
    gives. Q4_0 and Q4_1 codes are 0-15 (uint8), Q8_0 codes -128-127 (int8)."""

    kind: str  # the GGUF type the blocks came from
    scale: np.ndarray  # float32 [N, K / 32]
    offset: np.ndarray  # float32 [N, K / 32]
    codes: np.ndarray  # uint8 (4-bit values) or int8 [N, K]

    @property
    def bits(self) -> int:
        return 8 if self.codes.dtype == np.int8 else 4

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1]

    def rows(self, rank: int, size: int) -> BlockWeights:
        """Rank's contiguous 1/size of the rows (a column-parallel slice)."""
        step = self.shape[0] // size
        part = slice(rank * step, (rank + 1) * step)
        return BlockWeights(self.kind, self.scale[part], self.offset[part], self.codes[part])

    def columns(self, rank: int, size: int) -> BlockWeights | None:
        """Rank's contiguous 1/size of the columns (a row-parallel slice), or None where
        that would cut a block of 32."""
        step = self.shape[1] // size
        if step % BLOCK:
            return None
        blocks = slice(rank * step // BLOCK, (rank + 1) * step // BLOCK)
        return BlockWeights(
            self.kind,
            np.ascontiguousarray(self.scale[:, blocks]),
            np.ascontiguousarray(self.offset[:, blocks]),
            np.ascontiguousarray(self.codes[:, rank * step : (rank + 1) * step]),
        )

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]; equal to gguf's dequantize of the blocks."""
        n, k = self.shape
        codes = self.codes.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
        scale, offset = self.scale[..., None], self.offset[..., None]
        return (scale * codes + offset).reshape(n, k)


def concat_block_weights(parts: Sequence[BlockWeights]) -> BlockWeights | None:
    """The parts stacked along N (a fused projection), or None where their code widths
    or K differ and no one block layout holds them all."""
    if len({(p.bits, p.shape[1]) for p in parts}) != 1:
        return None
    return BlockWeights(
        kind="+".join(sorted({p.kind for p in parts})),
        scale=np.concatenate([p.scale for p in parts]),
        offset=np.concatenate([p.offset for p in parts]),
        codes=np.concatenate([p.codes for p in parts]),
    )


def _decode_blocks(kind: GGMLQuantizationType, rows: np.ndarray) -> BlockWeights | None:
    """rows: the tensor's bytes, uint8 [N, bytes per row] -> its blocks, or None for a
    type other than Q4_0, Q4_1 and Q8_0."""
    n = rows.shape[0]
    if kind == GGMLQuantizationType.Q8_0:  # per block: d (f16), 32 x int8
        blocks = rows.reshape(n, -1, 2 + BLOCK)
        scale = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        codes = blocks[..., 2:].copy().view(np.int8).reshape(n, -1)
        return BlockWeights("Q8_0", scale, np.zeros_like(scale), codes)
    if kind not in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
        return None
    # per block: d (f16), [m (f16),] 16 bytes: weight i in the low nibble of byte i,
    # weight 16 + i in its high nibble
    header = 2 if kind == GGMLQuantizationType.Q4_0 else 4
    blocks = rows.reshape(n, -1, header + BLOCK // 2)
    scale = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == GGMLQuantizationType.Q4_0:  # d * (q - 8) = d * q + (-8 d), both exact
        offset = -8 * scale
    else:
        offset = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., header:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)
    return BlockWeights(kind.name, scale, offset, codes)


class GGUFModel:
    """An open GGUF file. The reader memory-maps it; tensors dequantize on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reader = GGUFReader(str(path))
        self.architecture = str(self._field("general.architecture"))
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"GGUF architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        names = {t.name for t in self.reader.tensors}
        if "rope_freqs.weight" in names:
            raise UnsupportedModelError(
                "GGUF files with baked rope_freqs (llama3-style RoPE scaling) are not supported; "
                "use the Hugging Face safetensors directory of this model instead"
            )
        self._has_output = "output.weight" in names

    def _field(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def config(self) -> ModelConfig:
        arch = self.architecture
        num_heads = int(self._field(f"{arch}.attention.head_count"))
        hidden = int(self._field(f"{arch}.embedding_length"))
        vocab = self._field(f"{arch}.vocab_size") or len(self._field("tokenizer.ggml.tokens"))
        eos = self._field("tokenizer.ggml.eos_token_id")
        return ModelConfig(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self._field(f"{arch}.feed_forward_length")),
            num_layers=int(self._field(f"{arch}.block_count")),
            num_heads=num_heads,
            num_kv_heads=int(self._field(f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=int(self._field(f"{arch}.attention.key_length", hidden // num_heads)),
            rms_norm_eps=float(self._field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self._field(f"{arch}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(self._field(f"{arch}.context_length", 4096)),
            tie_word_embeddings=not self._has_output,
            attention_bias=arch == "qwen2",
            rope_scaling=self._rope_scaling(),
            bos_token_id=self._field("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
        )

    def _rope_scaling(self) -> RopeScaling:
        arch = self.architecture
        kind = self._field(f"{arch}.rope.scaling.type", "none")
        if kind in ("none", None):
            return RopeScaling()
        if kind not in ("linear", "yarn"):
            raise UnsupportedModelError(f"GGUF RoPE scaling {kind!r} is not supported")
        return RopeScaling(
            kind=str(kind),
            factor=float(self._field(f"{arch}.rope.scaling.factor", 1.0)),
            original_max_position_embeddings=int(
                self._field(f"{arch}.rope.scaling.original_context_length", 4096)
            ),
        )

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (Hugging Face name, float32 tensor), q/k un-permuted for llama."""
        cfg = self.config()
        for t in self.reader.tensors:
            name = _hf_name(t.name)
            array = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            tensor = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
            if self.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
                tensor = _unpermute_rope_rows(tensor, heads)
            yield name, tensor

    def block_weights(self) -> dict[str, BlockWeights]:
        """The weights stored block-quantized (Q4_0, Q4_1, Q8_0), by Hugging Face name,
        q/k rows un-permuted for llama as in tensors()."""
        cfg = self.config()
        out = {}
        for t in self.reader.tensors:
            blocks = _decode_blocks(t.tensor_type, np.asarray(t.data))
            if blocks is None:
                continue
            name = _hf_name(t.name)
            if self.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
                order = _unpermute_rope_rows(torch.arange(blocks.shape[0]), heads).numpy()
                blocks = BlockWeights(
                    blocks.kind, blocks.scale[order], blocks.offset[order], blocks.codes[order]
                )
            out[name] = blocks
        return out


def _hf_name(gguf_name: str) -> str:
    match = _LAYER_RE.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        if part not in _LAYER_NAMES:
            raise UnsupportedModelError(f"unexpected GGUF tensor {gguf_name!r}")
        return f"layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if base not in _GLOBAL_NAMES:
        raise UnsupportedModelError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"{_GLOBAL_NAMES[base]}.{kind}"


def _unpermute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    # llama.cpp stores q/k rows of each head as interleaved (even, odd) pairs;
    # the Hugging Face layout keeps the two rotary halves apart.
    rows = w.shape[0]
    return (
        w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )
