"""The prefix cache: block hashes, the LRU of evictable blocks, reference counts, free-count
accounting and the longest-prefix lookup."""

import pytest

from pdserve.engine.kv_cache import BlockAllocator, OutOfBlocks
from pdserve.engine.prefix_cache import (
    PrefixCachingAllocator,
    acquire_blocks,
    block_hashes,
    cacheable_blocks,
)

BS = 4


def test_same_prefix_same_hashes_and_only_full_blocks() -> None:
    a = block_hashes(list(range(10)), BS)
    b = block_hashes([*list(range(8)), 99, 98, 97], BS)
    assert len(a) == 2 and len(b) == 2  # 10 and 11 tokens: two full blocks each
    assert a == b
    assert len(set(a)) == 2


def test_a_differing_earlier_block_changes_every_later_hash() -> None:
    base = list(range(16))
    other = base.copy()
    other[1] = 500  # in the first block
    a, b = block_hashes(base, BS), block_hashes(other, BS)
    assert all(x != y for x, y in zip(a, b, strict=True))
    # The same block contents after different parents hash differently too.
    assert block_hashes(base[4:8], BS)[0] != a[1]


def test_salt_separates_models_and_known_hashes_are_extended() -> None:
    toks = list(range(12))
    assert block_hashes(toks, BS, "m1") != block_hashes(toks, BS, "m2")
    full = block_hashes(toks, BS, "m1")
    assert block_hashes(toks, BS, "m1", full[:1]) == full


def test_lookup_never_covers_the_last_token() -> None:
    assert cacheable_blocks(8, BS) == 1  # 2 full blocks, but the 8th token is computed
    assert cacheable_blocks(9, BS) == 2
    assert cacheable_blocks(1, BS) == 0
    a = PrefixCachingAllocator(8)
    toks = list(range(8))
    hashes = block_hashes(toks, BS)
    ids = a.allocate(2)
    a.cache(ids, hashes)
    a.free(ids)
    got = acquire_blocks(a, hashes, len(toks), 2, BS)
    assert got is not None
    blocks, hit = got
    assert hit == 1 and blocks[0] == ids[0] and len(blocks) == 2


def test_freed_cached_blocks_count_as_free_and_are_evicted_lru_first() -> None:
    a = PrefixCachingAllocator(4)
    h = block_hashes(list(range(16)), BS)
    ids = a.allocate(4)
    a.cache(ids, h)
    assert a.num_free == 0 and a.usage == 1.0
    a.free(ids[:2])  # request 1: its blocks parked tail first
    a.free(ids[2:])
    assert a.num_free == 4 and a.num_evictable == 4 and a.num_used == 0 and a.usage == 0.0
    assert a.can_allocate(4)
    # LRU: request 1's tail (ids[1]) goes first, then its head, then request 2's tail.
    assert a.allocate(1) == [ids[1]]
    assert a.allocate(1) == [ids[0]]
    assert a.allocate(1) == [ids[3]]
    assert a.match(h) == []  # the first block is gone: no prefix left
    assert a.match(h[2:]) == [ids[2]]  # it survives, unreachable from the chain's head
    assert a.num_cached == 1 and a.evicted == 3


def test_free_list_is_used_before_evicting() -> None:
    a = PrefixCachingAllocator(4)
    h = block_hashes(list(range(4)), BS)
    ids = a.allocate(1)
    a.cache(ids, h)
    a.free(ids)
    others = a.allocate(3)
    assert ids[0] not in others and a.match(h) == ids
    assert a.allocate(1) == ids and a.match(h) == []
    with pytest.raises(OutOfBlocks):
        a.allocate(1)


def test_a_shared_cached_block_is_never_handed_out_while_referenced() -> None:
    a = PrefixCachingAllocator(3)
    h = block_hashes(list(range(8)), BS)
    mine = a.allocate(2)
    a.cache(mine, h)
    hit = a.match(h)
    assert hit == mine
    a.share(hit)  # a second request shares both
    assert a.ref_count(mine[0]) == 2
    a.free(mine)  # the first request ends: the blocks stay held by the second
    assert a.num_free == 1 and a.num_evictable == 0
    other = a.allocate(1)
    assert other[0] not in mine
    with pytest.raises(OutOfBlocks):
        a.allocate(1)
    a.free(hit)
    assert a.num_evictable == 2 and a.num_free == 2
    a.share(a.match(h))  # revived from the LRU
    assert a.num_evictable == 0 and a.ref_count(mine[0]) == 1


def test_share_and_free_refuse_bad_blocks() -> None:
    a = PrefixCachingAllocator(2)
    with pytest.raises(ValueError):
        a.share([0])  # neither held nor cached
    ids = a.allocate(1)
    a.free(ids)
    with pytest.raises(ValueError):
        a.free(ids)
    with pytest.raises(ValueError):
        a.cache([1], block_hashes(list(range(4)), BS))  # not allocated


def test_a_hash_cached_twice_keeps_the_first_block() -> None:
    a = PrefixCachingAllocator(4)
    h = block_hashes(list(range(4)), BS)
    first, second = a.allocate(1), a.allocate(1)
    a.cache(first, h)
    a.cache(second, h)  # computed twice concurrently: the second copy stays private
    a.free(second)
    assert a.num_evictable == 0 and a.match(h) == first


def test_acquire_counts_revived_blocks_against_the_free_ones() -> None:
    a = PrefixCachingAllocator(3)
    toks = list(range(12))
    h = block_hashes(toks, BS)
    ids = a.allocate(3)
    a.cache(ids, h)
    a.free(ids)  # all three evictable: 3 free
    # 12 tokens + a slot for the first output: 4 blocks, 2 of them cached (not the third:
    # it holds the last prompt token): 2 revived + 2 new > 3 free.
    assert acquire_blocks(a, h, 12, 4, BS) is None
    assert a.num_free == 3 and a.num_evictable == 3  # nothing taken
    got = acquire_blocks(a, h, 12, 3, BS)  # 2 revived + 1 new: the third is evicted
    assert got is not None and got[1] == 2 and got[0][:2] == ids[:2]
    assert a.num_free == 0


def test_plain_allocator_never_hits() -> None:
    a = BlockAllocator(4)
    got = acquire_blocks(a, block_hashes(list(range(8)), BS), 8, 3, BS)
    assert got is not None and got[1] == 0 and a.num_free == 1


def test_reset_forgets_evictable_blocks() -> None:
    a = PrefixCachingAllocator(2)
    h = block_hashes(list(range(8)), BS)
    ids = a.allocate(2)
    a.cache(ids, h)
    a.free(ids)
    assert a.reset() == 2 and a.num_cached == 0 and a.num_free == 2 and a.match(h) == []
