import pytest

from pdserve.engine.kv_cache import BlockAllocator, OutOfBlocks


def test_allocate_and_free_roundtrip() -> None:
    a = BlockAllocator(8)
    ids = a.allocate(5)
    assert len(set(ids)) == 5 and a.num_free == 3 and a.num_used == 5
    assert a.usage == pytest.approx(5 / 8)
    a.free(ids[:2])
    assert a.num_free == 5
    more = a.allocate(5)
    assert not set(more) & set(ids[2:])  # never hands out a held block
    a.free(more + ids[2:])
    assert a.num_free == 8


def test_out_of_blocks_leaves_state_unchanged() -> None:
    a = BlockAllocator(4)
    a.allocate(3)
    with pytest.raises(OutOfBlocks):
        a.allocate(2)
    assert a.num_free == 1
    assert a.can_allocate(1) and not a.can_allocate(2)


def test_double_free_and_bad_ids_are_refused() -> None:
    a = BlockAllocator(4)
    ids = a.allocate(2)
    a.free(ids)
    with pytest.raises(ValueError):
        a.free(ids[:1])
    with pytest.raises(ValueError):
        a.free([99])
    assert a.num_free == 4


def test_shared_blocks_return_after_last_reference() -> None:
    a = BlockAllocator(4)
    ids = a.allocate(2)
    a.share(ids)
    assert a.ref_count(ids[0]) == 2
    a.free(ids)
    assert a.num_free == 2
    a.free(ids)
    assert a.num_free == 4
    with pytest.raises(ValueError):
        a.share(ids)
