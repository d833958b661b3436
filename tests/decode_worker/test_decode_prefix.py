"""The decode scheduler with prefix caching: leases share the prefix the worker holds, and
every full block whose KV is in place (received, prefilled here, decoded) is cached."""

import itertools

import pytest

from pdserve.decode_worker.scheduler import DecodeScheduler
from pdserve.engine.messages import Reservation
from pdserve.engine.prefix_cache import PrefixCachingAllocator, block_hashes
from pdserve.engine.sequence import SamplingParams

BS = 4
_orders = itertools.count()


def make(blocks: int = 16) -> DecodeScheduler:
    return DecodeScheduler(PrefixCachingAllocator(blocks), BS, "d0", 8, salt="m")


def res(rid: str, tokens: list[int], max_tokens: int = 100) -> Reservation:
    return Reservation(rid, len(tokens), 0, SamplingParams(max_tokens=max_tokens,
                                                           eos_token_ids=(2,)),
                       next(_orders), token_ids=tuple(tokens))


def test_a_received_prompt_is_cached_and_the_next_lease_shares_it() -> None:
    s = make()
    prompt = list(range(10, 22))  # 12 tokens: three full blocks
    lease = s.reserve(res("a", prompt))
    assert lease is not None and lease.cached_blocks == 0 and lease.num_blocks == 4
    assert s.activate(lease.transfer_id, 7)
    alloc = s.allocator
    assert isinstance(alloc, PrefixCachingAllocator)
    assert alloc.num_cached == 3
    a = s.find("a")
    assert a is not None
    lease_b = s.reserve(res("b", [*prompt, 30, 31]))
    assert lease_b is not None and lease_b.cached_blocks == 3
    b = s.find("b")
    assert b is not None and b.block_ids[:3] == a.block_ids[:3]
    assert alloc.ref_count(a.block_ids[0]) == 2
    # The same prompt again: its last block holds its last token, never a hit.
    lease_c = s.reserve(res("c", prompt))
    assert lease_c is not None and lease_c.cached_blocks == 2


def test_decoded_blocks_are_cached_and_found_by_the_next_turn() -> None:
    s = make()
    prompt = list(range(10, 16))  # 6 tokens
    lease = s.reserve(res("a", prompt, max_tokens=6))
    assert lease is not None
    s.activate(lease.transfer_id, 100)  # context: 6 + the first token
    outs = []
    for tok in (101, 102, 103, 104, 105):
        plan = s.schedule()
        outs = s.postprocess(plan.batch, [tok])
    assert outs[-1].finish_reason == "length"
    alloc = s.allocator
    assert isinstance(alloc, PrefixCachingAllocator)
    # 6 prompt + 6 generated = 12 tokens, the last one's KV never stored: 2 full blocks.
    turn = [*prompt, 100, 101, 102, 103, 104, 105]
    assert alloc.num_cached == 2 and alloc.num_free == 16
    assert alloc.match(block_hashes(turn, BS, "m")) != []
    lease2 = s.reserve(res("turn2", [*turn, 50, 51, 52]))
    assert lease2 is not None and lease2.cached_blocks == 2


def test_local_prefill_starts_after_the_cached_prefix() -> None:
    s = make()
    prompt = list(range(10, 22))
    first = s.reserve(res("a", prompt))
    assert first is not None
    s.activate(first.transfer_id, 7)
    lease = s.reserve(res("b", [*prompt, 1, 2, 3]))
    assert lease is not None and lease.cached_blocks == 3
    assert s.start_prefill(lease.transfer_id, [*prompt, 1, 2, 3])
    chunks = s.schedule_prefill(64)
    assert [(c.start, c.length) for c in chunks] == [(12, 3)]
    with pytest.raises(ValueError):
        other = s.reserve(res("c", prompt))
        assert other is not None
        s.start_prefill(other.transfer_id, list(range(12)))  # not the tokens it leased


def test_preempted_blocks_stay_cached_for_the_re_prefill() -> None:
    s = make(blocks=4)
    prompt = list(range(10, 18))  # 8 tokens: 2 full blocks, lease of 3
    lease = s.reserve(res("a", prompt))
    assert lease is not None
    s.activate(lease.transfer_id, 7)
    s.release("a")  # preempted or aborted: the full blocks stay findable
    alloc = s.allocator
    assert isinstance(alloc, PrefixCachingAllocator)
    assert alloc.num_free == 4 and alloc.num_evictable == 2
    again = s.reserve(res("a", [*prompt, 7]))
    assert again is not None and again.cached_blocks == 2


def test_reservation_tokens_must_match_its_count() -> None:
    s = make()
    bad = Reservation("a", 5, 0, SamplingParams(), 0, token_ids=(1, 2, 3))
    with pytest.raises(ValueError, match="token ids"):
        s.reserve(bad)
