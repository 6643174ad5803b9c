"""BlockPool: exact block ids, ref counts and LRU eviction; invariants after every operation."""

from __future__ import annotations

import pytest

from engine.kv.block_pool import BlockPool, InvariantError, NoFreeBlocksError


def checked(pool: BlockPool) -> BlockPool:
    pool.check_invariants()
    return pool


def test_allocate_and_release_round_trip():
    pool = checked(BlockPool(4))
    assert pool.allocate(3) == [0, 1, 2]
    checked(pool)
    assert pool.num_free_blocks == 1
    pool.release([2, 1, 0])
    checked(pool)
    assert pool.num_free_blocks == 4
    assert pool.allocate(4) == [3, 2, 1, 0]  # the free list is FIFO
    checked(pool)


def test_allocate_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(2)
    pool.allocate(1)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    checked(pool)
    assert pool.num_free_blocks == 1


def test_shared_block_is_freed_only_by_its_last_holder():
    pool = BlockPool(3)
    [b] = pool.allocate(1)
    pool.cache(b, b"h0")
    pool.touch([b])
    checked(pool)
    assert pool.ref_count(b) == 2
    pool.release([b])
    checked(pool)
    assert pool.ref_count(b) == 1 and pool.num_free_blocks == 2
    pool.release([b])
    checked(pool)
    assert pool.num_free_blocks == 3
    assert pool.lookup(b"h0") == b  # still cached while free


def test_cached_free_block_is_revived_by_touch():
    pool = BlockPool(2)
    [b] = pool.allocate(1)
    pool.cache(b, b"h")
    pool.release([b])
    pool.touch([pool.lookup(b"h")])
    checked(pool)
    assert pool.ref_count(b) == 1 and pool.num_free_blocks == 1


def test_plain_free_blocks_are_used_before_cached_ones_and_lru_is_evicted_first():
    pool = BlockPool(4)
    a, b, c, _ = pool.allocate(4)
    pool.cache(a, b"a")
    pool.cache(b, b"b")
    pool.release([b])  # b freed first: least recently used
    pool.release([a])
    pool.release([c])  # plain free
    checked(pool)
    assert pool.allocate(1) == [c]
    assert pool.allocate(1) == [b]  # evicts b, the LRU cached block
    checked(pool)
    assert pool.lookup(b"b") is None and pool.lookup(b"a") == a


def test_duplicate_hash_keeps_the_first_block():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, b"same")
    pool.cache(b, b"same")
    checked(pool)
    assert pool.lookup(b"same") == a
    pool.release([a, b])
    checked(pool)


def test_release_of_a_free_block_is_refused():
    pool = BlockPool(1)
    [a] = pool.allocate(1)
    pool.release([a])
    with pytest.raises(RuntimeError):
        pool.release([a])
    checked(pool)


def test_check_invariants_detects_a_lost_block():
    pool = BlockPool(2)
    pool._free.popleft()  # corrupt on purpose: block 0 is now in no state
    with pytest.raises(InvariantError):
        pool.check_invariants()


def test_reset_prefix_cache_forgets_hashes():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, b"a")
    pool.cache(b, b"b")
    pool.release([a])
    pool.reset_prefix_cache()
    checked(pool)
    assert pool.lookup(b"a") is None and pool.lookup(b"b") is None
    assert pool.num_free_blocks == 1
