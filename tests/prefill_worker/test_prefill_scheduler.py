import pytest

from pdserve.engine.kv_cache import BlockAllocator
from pdserve.engine.messages import Lease, PrefillTask
from pdserve.engine.sequence import SamplingParams
from pdserve.prefill_worker.scheduler import PrefillScheduler

LEASE = Lease("d0", "x", 1, 0, 1, 30.0)


def task(rid: str, n: int) -> PrefillTask:
    return PrefillTask(rid, tuple(range(1, n + 1)), 0, SamplingParams(), LEASE)


def test_batches_under_token_budget() -> None:
    s = PrefillScheduler(BlockAllocator(64), 4, max_batch_tokens=16)
    for rid, n in (("a", 5), ("b", 6), ("c", 9)):
        s.add(task(rid, n))
    chunks = s.schedule()
    # a and b fit whole; c gets the 5 tokens left of the budget (chunked prefill).
    assert [(c.seq.task.request_id, c.start, c.length) for c in chunks] == [
        ("a", 0, 5), ("b", 0, 6), ("c", 0, 5)]
    done = s.complete(chunks)
    assert [q.task.request_id for q in done] == ["a", "b"]
    chunks = s.schedule()
    assert [(c.seq.task.request_id, c.start, c.length) for c in chunks] == [("c", 5, 4)]
    assert chunks[0].is_last
    assert [q.task.request_id for q in s.complete(chunks)] == ["c"]


def test_long_prompt_is_chunked_over_steps() -> None:
    s = PrefillScheduler(BlockAllocator(64), 4, max_batch_tokens=8)
    s.add(task("long", 20))
    starts = []
    while True:
        chunks = s.schedule()
        starts.append((chunks[0].start, chunks[0].length))
        if s.complete(chunks):
            break
    assert starts == [(0, 8), (8, 8), (16, 4)]


def test_waits_for_blocks_and_keeps_order() -> None:
    alloc = BlockAllocator(4)
    s = PrefillScheduler(alloc, 4, max_batch_tokens=64)
    s.add(task("a", 12))  # 3 blocks
    s.add(task("b", 8))  # 2 blocks: must wait
    chunks = s.schedule()
    assert [c.seq.task.request_id for c in chunks] == ["a"]
    (a,) = s.complete(chunks)
    assert s.schedule() == []  # a still holds its blocks (its KV is in flight)
    alloc.free(a.block_ids)
    assert [c.seq.task.request_id for c in s.schedule()] == ["b"]


def test_abort_and_bad_prompts() -> None:
    s = PrefillScheduler(BlockAllocator(4), 4, max_batch_tokens=64)
    with pytest.raises(ValueError):
        s.add(task("empty", 0))
    with pytest.raises(ValueError):
        s.add(task("huge", 17))  # more blocks than the pool has
    s.add(task("a", 3))
    assert s.abort("a") is not None and s.abort("a") is None
    assert s.schedule() == []


@pytest.mark.parametrize("admitted", [False, True])
def test_abort_by_transfer_id_spares_the_requests_other_attempt(admitted: bool) -> None:
    """A retried request can have its old and its new attempt on one worker: the abort of
    the old one (its lease's transfer id) must leave the new one alone."""
    s = PrefillScheduler(BlockAllocator(16), 4, max_batch_tokens=64)
    old = PrefillTask("r", (1, 2, 3), 0, SamplingParams(), Lease("d0", "r", 7, 0, 1, 30.0))
    new = PrefillTask("r", (1, 2, 3), 0, SamplingParams(), Lease("d0", "r", 8, 0, 1, 30.0))
    s.add(old)
    s.add(new)
    if admitted:  # both prefilling (in the chunker), not waiting
        s.schedule()
    gone = s.abort("r", 7)
    assert gone is not None and gone.task is old
    assert s.abort("r", 7) is None
    left = [q.task for q in (s.active if admitted else s.waiting)]
    assert left == [new]
    assert s.abort("r") is not None and s.abort("r") is None  # no id: any attempt
