"""The KV cache tensors, and a request's blocks exported and imported as data.

An export is a KVBlockMeta (plain fields, serialisable as a dict for msgpack or
protobuf; never pickle) plus one tensor [num_layers, num_blocks, 2, BS, KVH, D]
of the blocks in the request's order. The checksum covers only the filled
slots, so garbage in the unused tail of the last block does not matter.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Any

import torch

from engine.errors import KVImportError


@dataclass(frozen=True)
class KVBlockMeta:
    model_id: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_tokens: int
    block_ids: list[int]  # on the exporting side
    checksum: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVBlockMeta:
        return cls(**data)


class PagedKVCache:
    """One tensor per layer, in the attention backend's layout."""

    def __init__(self, layers: list[torch.Tensor], block_size: int) -> None:
        self.layers = layers  # each [NB, 2, BS, KVH, D]
        self.block_size = block_size

    @property
    def num_blocks(self) -> int:
        return self.layers[0].shape[0]

    @property
    def block_shape(self) -> tuple[int, ...]:
        """One block of one layer as read and written: [2, BS, KVH, D]."""
        return tuple(self.layers[0].shape[1:])

    def read_blocks(self, block_ids: list[int], layers: range | None = None) -> torch.Tensor:
        """The blocks of these layers (default all), gathered into one new tensor
        [len(layers), n, 2, BS, KVH, D]."""
        index = torch.tensor(block_ids, dtype=torch.int64)
        selected = self.layers if layers is None else self.layers[layers.start : layers.stop]
        first = selected[0]
        out = first.new_empty((len(selected), len(block_ids), *first.shape[1:]))
        for layer, layer_out in zip(selected, out):
            torch.index_select(layer, 0, index, out=layer_out)
        return out

    def write_blocks(self, block_ids: list[int], data: torch.Tensor, first_layer: int = 0) -> None:
        """Writes data [layers, n, ...] into these blocks, from layer `first_layer` on."""
        index = torch.tensor(block_ids, dtype=torch.int64)
        for layer, layer_data in zip(self.layers[first_layer:], data):
            layer.index_copy_(0, index, layer_data.to(layer.dtype))


class ShardedKVCache(PagedKVCache):
    """A tensor-parallel engine's cache as its driver sees it (engine/parallel.py): every
    rank's slice of the KV heads, in shared memory. `layers` is the driver's own slice,
    for its attention; blocks are read and written with all the heads, in rank order."""

    HEADS_DIM = -2  # of a layer [NB, 2, BS, KVH, D]

    def __init__(self, shards: list[list[torch.Tensor]], block_size: int) -> None:
        super().__init__(shards[0], block_size)
        self.shards = shards  # [rank][layer]

    @property
    def block_shape(self) -> tuple[int, ...]:
        two, block_size, heads, head_dim = self.layers[0].shape[1:]
        return two, block_size, heads * len(self.shards), head_dim

    def read_blocks(self, block_ids: list[int], layers: range | None = None) -> torch.Tensor:
        parts = [
            PagedKVCache(shard, self.block_size).read_blocks(block_ids, layers)
            for shard in self.shards
        ]
        return torch.cat(parts, dim=self.HEADS_DIM)

    def write_blocks(self, block_ids: list[int], data: torch.Tensor, first_layer: int = 0) -> None:
        parts = data.chunk(len(self.shards), dim=self.HEADS_DIM)
        for shard, part in zip(self.shards, parts):
            PagedKVCache(shard, self.block_size).write_blocks(block_ids, part, first_layer)


def kv_checksum(data: torch.Tensor) -> int:
    """CRC-32 of blocks [L, n, 2, BS, KVH, D] as they travel, read in place (no copy)."""
    return zlib.crc32(data.contiguous().view(torch.uint8).numpy().data)


def check_layout(meta: KVBlockMeta, expected: KVBlockMeta) -> None:
    """Raises KVImportError unless blocks laid out as `meta` fit this engine's cache."""
    for name in LAYOUT_FIELDS:
        if getattr(meta, name) != getattr(expected, name):
            raise KVImportError(
                f"KV blocks have {name}={getattr(meta, name)!r}, "
                f"this engine {getattr(expected, name)!r}"
            )


LAYOUT_FIELDS = ("model_id", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim")


def check_import(meta: KVBlockMeta, expected: KVBlockMeta, data: torch.Tensor) -> None:
    """Raises KVImportError unless `data` matches this engine's layout and the checksum."""
    check_layout(meta, expected)
    num_blocks = -(-meta.num_tokens // meta.block_size)
    if data.shape[1] != num_blocks or len(meta.block_ids) != num_blocks:
        raise KVImportError(
            f"{meta.num_tokens} tokens need {num_blocks} blocks, got {data.shape[1]}"
        )
    if kv_checksum(data) != meta.checksum:
        raise KVImportError("KV blocks failed their checksum: the transfer corrupted them")
