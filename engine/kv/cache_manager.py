"""Which blocks each request holds: allocation, prefix-cache matching, release.

A request's block i holds the keys/values of tokens [i * BS, (i + 1) * BS).
Block i's hash chains the hash of block i-1 with the block's token ids, so equal
hashes mean equal prefixes. A block is registered in the cache only once it is
full and its keys/values have been computed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from engine.kv.block_pool import BlockPool
from engine.request import Request


def hash_block(parent: bytes | None, token_ids: list[int]) -> bytes:
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Counted in tokens as vLLM does, once per admission (a lookup whose allocation
        # fails is retried next step and must not count twice): queries are the prompt
        # tokens looked up, hits the tokens found cached.
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0
        self._pending_lookup: tuple[Request, int] | None = None  # (request, hit tokens)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, request: Request) -> list[int]:
        """Cached blocks holding the longest computed prefix of the request.

        The last token is never matched: its logits must be computed to sample.
        """
        if not self.enable_prefix_caching:
            return []
        num_full = (request.num_tokens - 1) // self.block_size
        self._extend_hashes(request, num_full)
        hits = []
        for block_hash in request.block_hashes[:num_full]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        self._pending_lookup = (request, len(hits) * self.block_size)
        return hits

    def allocate(
        self, request: Request, num_new_tokens: int, prefix_block_ids: Sequence[int] = ()
    ) -> bool:
        """Gives the request blocks for `num_new_tokens` more tokens; False if too few are free.

        `prefix_block_ids` (from match_prefix, for a request holding no blocks)
        become its first blocks and count as computed.
        """
        num_held = len(request.block_ids) + len(prefix_block_ids)
        num_computed = request.num_computed_tokens + len(prefix_block_ids) * self.block_size
        num_needed = self.blocks_for(num_computed + num_new_tokens) - num_held
        num_revived = sum(self.pool.ref_count(b) == 0 for b in prefix_block_ids)
        if num_needed + num_revived > self.pool.num_free_blocks:
            return False
        if prefix_block_ids:
            self.pool.touch(prefix_block_ids)
            request.block_ids = list(prefix_block_ids)
            request.num_computed_tokens = num_computed
            request.num_hashed_blocks = len(prefix_block_ids)
        request.block_ids.extend(self.pool.allocate(max(num_needed, 0)))
        self._count_lookup(request)
        return True

    def _count_lookup(self, request: Request) -> None:
        """Counts the request's prefix lookup now that it is admitted (see __init__)."""
        if self._pending_lookup is None or self._pending_lookup[0] is not request:
            return
        self.num_prefix_queries += request.num_tokens
        self.num_prefix_hits += self._pending_lookup[1]
        self._pending_lookup = None

    def cache_computed_blocks(self, request: Request) -> None:
        """Registers the request's newly full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        if num_full <= request.num_hashed_blocks:
            return
        self._extend_hashes(request, num_full)
        for i in range(request.num_hashed_blocks, num_full):
            self.pool.cache(request.block_ids[i], request.block_hashes[i])
        request.num_hashed_blocks = num_full

    def free(self, request: Request) -> None:
        # Tail blocks first: they are the least likely to be shared, so evict them first.
        self.pool.release(reversed(request.block_ids))
        request.block_ids = []
        request.num_hashed_blocks = 0

    def _extend_hashes(self, request: Request, num_blocks: int) -> None:
        bs = self.block_size
        hashes = request.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, request.token_ids[i * bs : (i + 1) * bs]))

    @property
    def usage(self) -> float:
        return self.pool.num_used_blocks / self.pool.num_blocks

    def check_invariants(self) -> None:
        self.pool.check_invariants()
