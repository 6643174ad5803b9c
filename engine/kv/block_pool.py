"""The pool of KV blocks: a free list, reference counts and the prefix-hash index.

Pure Python; it never touches tensors. Every block is in exactly one state:

    in use          ref_count > 0                       (held by >= 1 request)
    free            ref_count == 0, no hash             (in `_free`)
    free, cached    ref_count == 0, hash in `_cached`   (in `_evictable`, LRU order)

    allocate():  free ──▶ in use; when no plain free block is left, the least
                 recently used cached block is evicted (its hash forgotten).
    touch():     free, cached ──▶ in use (a prefix-cache hit); or in use, +1 ref.
    release():   ref_count - 1; at 0, a hashed block becomes free-cached
                 (most recently used), an unhashed one plain free.
    cache():     an in-use, full block gets its hash so later requests can share it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable


class NoFreeBlocksError(RuntimeError):
    """Raised by allocate() when fewer blocks are free than asked for."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._cached: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocate() can hand out now, cached ones included."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, num: int) -> list[int]:
        if num > self.num_free_blocks:
            raise NoFreeBlocksError(f"asked for {num} blocks, {self.num_free_blocks} free")
        block_ids = []
        for _ in range(num):
            if self._free:
                block_id = self._free.popleft()
            else:
                block_id, _ = self._evictable.popitem(last=False)
                self._forget_hash(block_id)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def lookup(self, block_hash: bytes) -> int | None:
        """The block holding this hash's content, if it is cached."""
        return self._cached.get(block_hash)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Adds a reference to each block (prefix-cache hits); free ones leave the LRU."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._evictable[block_id]
            self._ref_counts[block_id] += 1

    def release(self, block_ids: Iterable[int]) -> None:
        """Drops one reference from each block. The first released is the first evicted."""
        for block_id in block_ids:
            if self._ref_counts[block_id] <= 0:
                raise RuntimeError(f"block {block_id} released while not in use")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                if self._hash_of[block_id] is None:
                    self._free.append(block_id)
                else:
                    self._evictable[block_id] = None

    def cache(self, block_id: int, block_hash: bytes) -> None:
        """Makes a full, in-use block findable by its hash (no-op if the hash is known)."""
        if self._ref_counts[block_id] <= 0:
            raise RuntimeError(f"block {block_id} cached while not in use")
        if block_hash in self._cached or self._hash_of[block_id] is not None:
            return  # same content already cached elsewhere, or this block already hashed
        self._cached[block_hash] = block_id
        self._hash_of[block_id] = block_hash

    def reset_prefix_cache(self) -> None:
        """Forgets every cached hash; cached free blocks become plain free blocks."""
        for block_id in list(self._evictable):
            self._free.append(block_id)
        self._evictable.clear()
        self._hash_of = [None] * self.num_blocks
        self._cached.clear()

    def _forget_hash(self, block_id: int) -> None:
        block_hash = self._hash_of[block_id]
        if block_hash is not None:
            del self._cached[block_hash]
            self._hash_of[block_id] = None

    def check_invariants(self) -> None:
        """Raises InvariantError if any block is in no state, or in two."""
        free = set(self._free)
        evictable = set(self._evictable)
        _check(len(free) == len(self._free), "a block is twice in the free list")
        _check(not free & evictable, "a block is both free and cached-free")
        for block_id in range(self.num_blocks):
            ref, block_hash = self._ref_counts[block_id], self._hash_of[block_id]
            _check(ref >= 0, f"block {block_id} has ref_count {ref}")
            if ref > 0:
                _check(
                    block_id not in free and block_id not in evictable,
                    f"used block {block_id} is on a free list",
                )
            elif block_hash is None:
                _check(block_id in free, f"free block {block_id} is on no free list")
            else:
                _check(block_id in evictable, f"cached free block {block_id} is not evictable")
            if block_hash is not None:
                _check(
                    self._cached.get(block_hash) == block_id,
                    f"hash of block {block_id} not indexed",
                )
        _check(len(self._cached) == sum(h is not None for h in self._hash_of), "stale hash index")


class InvariantError(AssertionError):
    """An allocator or queue is in an impossible state: a bug in tandem."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvariantError(message)
