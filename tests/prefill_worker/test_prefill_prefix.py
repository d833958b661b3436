"""The prefill scheduler with prefix caching: a prompt starting like an earlier one is a
chunk from the cached prefix on, and only the blocks a decode worker lacks are sent."""

from pdserve.engine.messages import Lease, PrefillTask
from pdserve.engine.prefix_cache import PrefixCachingAllocator
from pdserve.engine.sequence import SamplingParams
from pdserve.prefill_worker.scheduler import PrefillScheduler

BS = 4


def task(rid: str, tokens: list[int], cached_on_decode: int = 0) -> PrefillTask:
    lease = Lease("d0", rid, 1, 0, 1, 30.0, cached_blocks=cached_on_decode)
    return PrefillTask(rid, tuple(tokens), 0, SamplingParams(), lease)


def run(s: PrefillScheduler) -> list[tuple[str, int, int]]:
    chunks = s.schedule()
    s.complete(chunks)
    return [(c.seq.task.request_id, c.start, c.length) for c in chunks]


def test_second_prompt_starts_after_the_cached_prefix() -> None:
    alloc = PrefixCachingAllocator(32)
    s = PrefillScheduler(alloc, BS, max_batch_tokens=64)
    prefix = list(range(100, 112))  # three full blocks
    s.add(task("a", [*prefix, 1, 2, 3]))
    assert run(s) == [("a", 0, 15)]
    s.add(task("b", [*prefix, 7, 8, 9, 10, 11]))
    seq = s.waiting[0]
    assert run(s) == [("b", 12, 5)]
    assert seq.cached_tokens == 12


def test_same_prompt_twice_recomputes_its_last_token() -> None:
    alloc = PrefixCachingAllocator(32)
    s = PrefillScheduler(alloc, BS, max_batch_tokens=64)
    prompt = list(range(1, 17))  # exactly four full blocks
    s.add(task("a", prompt))
    run(s)
    s.add(task("b", prompt))
    # Three blocks cached; the fourth holds the last token, whose logits are needed.
    assert run(s) == [("b", 12, 4)]


def test_cached_blocks_stay_held_while_shared_and_are_evictable_after() -> None:
    alloc = PrefixCachingAllocator(8)
    s = PrefillScheduler(alloc, BS, max_batch_tokens=64)
    prompt = list(range(1, 10))  # 3 blocks, two full
    s.add(task("a", prompt))
    chunks = s.schedule()
    a = chunks[0].seq
    s.complete(chunks)
    # "a" finished prefill; its KV has not left yet (the worker frees its blocks after).
    s.add(task("b", prompt))
    chunks = s.schedule()
    b = chunks[0].seq
    assert chunks[0].start == 8 and b.block_ids[:2] == a.block_ids[:2]
    assert alloc.num_free == 8 - 3 - 1  # a's 3 blocks, b's own third one
    alloc.free(a.block_ids)  # a's KV left: the shared two stay b's
    assert alloc.num_free == 8 - 3 and alloc.num_evictable == 0
    s.complete(chunks)
    alloc.free(b.block_ids)
    assert alloc.num_free == 8 and alloc.num_evictable == 2


def test_cache_off_computes_everything() -> None:
    from pdserve.engine.kv_cache import BlockAllocator
    s = PrefillScheduler(BlockAllocator(32), BS, max_batch_tokens=64)
    prompt = list(range(1, 17))
    s.add(task("a", prompt))
    run(s)
    s.add(task("b", prompt))
    assert run(s) == [("b", 0, 16)]


def test_only_the_blocks_after_the_decode_workers_prefix_are_sent() -> None:
    alloc = PrefixCachingAllocator(32)
    s = PrefillScheduler(alloc, BS, max_batch_tokens=64)
    s.add(task("a", list(range(1, 12)), cached_on_decode=2))
    chunks = s.schedule()
    seq = chunks[0].seq
    assert len(seq.block_ids) == 3 and seq.sent_blocks == seq.block_ids[2:]
