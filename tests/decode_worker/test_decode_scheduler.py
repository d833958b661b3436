import itertools

import pytest
import torch

from pdserve.decode_worker.scheduler import DecodeScheduler, DecodeSeq
from pdserve.engine.kv_cache import BlockAllocator
from pdserve.engine.messages import Reservation
from pdserve.engine.sampler import sample_batch
from pdserve.engine.sequence import SamplingParams


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(blocks: int = 16, bs: int = 4, max_seqs: int = 8) -> tuple[DecodeScheduler, Clock]:
    clock = Clock()
    s = DecodeScheduler(BlockAllocator(blocks), bs, "d0", max_seqs, lease_timeout_s=5.0,
                        clock=clock)
    return s, clock


_orders = itertools.count()  # the router's admission numbers


def res(rid: str, n: int, max_tokens: int = 100, order: int | None = None) -> Reservation:
    """A reservation of a request admitted after every earlier one, unless ``order``."""
    return Reservation(rid, n, 0, SamplingParams(max_tokens=max_tokens, eos_token_ids=(2,)),
                       next(_orders) if order is None else order)


def join(s: DecodeScheduler, clock: Clock, rid: str, n: int, max_tokens: int = 100,
         order: int | None = None) -> None:
    lease = s.reserve(res(rid, n, max_tokens, order))
    assert lease is not None
    clock.t += 0.001
    assert s.activate(lease.transfer_id, 5)


def test_reserve_holds_prompt_plus_first_token() -> None:
    s, _ = make()
    lease = s.reserve(res("a", 8))  # 8 tokens + first token = 9 -> 3 blocks of 4
    assert lease is not None and lease.num_blocks == 3
    assert s.allocator.num_free == 13


def test_reserve_refuses_when_full_and_on_duplicates() -> None:
    s, _ = make(blocks=4)
    assert s.reserve(res("a", 12)) is not None  # 4 blocks
    assert s.reserve(res("b", 1)) is None
    with pytest.raises(ValueError):
        s.reserve(res("a", 1))


def test_lease_expiry_frees_blocks() -> None:
    s, clock = make()
    lease = s.reserve(res("a", 8))
    assert lease is not None
    clock.t = 4.0
    assert s.expire() == []
    clock.t = 5.0
    assert s.expire() == [("a", lease.transfer_id)]
    assert s.allocator.num_free == 16


def test_continuous_batching_and_growth() -> None:
    s, clock = make()
    join(s, clock, "a", 3)  # 4 tokens in context: exactly one block
    plan = s.schedule()
    assert [q.request_id for q in plan.batch] == ["a"]
    out = s.postprocess(plan.batch, [9])
    assert out[0].finish_reason is None
    join(s, clock, "b", 1)  # joins between steps
    plan = s.schedule()
    assert [q.request_id for q in plan.batch] == ["a", "b"]
    a = plan.batch[0]
    assert a.num_tokens == 5 and len(a.block_ids) == 2  # grew a block for position 4


def test_finish_frees_blocks() -> None:
    s, clock = make()
    join(s, clock, "a", 2, max_tokens=2)  # the first token counts: one more step ends it
    plan = s.schedule()
    out = s.postprocess(plan.batch, [9])
    assert out[0].finish_reason == "length"
    assert s.allocator.num_free == 16 and not s.running


def test_eos_finishes_with_stop() -> None:
    s, clock = make()
    join(s, clock, "a", 2)
    plan = s.schedule()
    assert s.postprocess(plan.batch, [2])[0].finish_reason == "stop"


def test_preempts_youngest_when_out_of_blocks() -> None:
    s, clock = make(blocks=4, bs=4)
    join(s, clock, "old", 3)  # 4 tokens: 1 block
    join(s, clock, "young", 11)  # 12 tokens: 3 blocks; pool now full
    plan = s.schedule()
    s.postprocess(plan.batch, [9, 9])  # both need a new block now
    plan = s.schedule()
    assert plan.preempted == ["young"]
    assert [q.request_id for q in plan.batch] == ["old"]
    assert len(plan.batch[0].block_ids) == 2
    assert s.allocator.num_free == 2


def test_preemption_makes_room_for_the_older_ones_in_one_step() -> None:
    s, clock = make(blocks=6, bs=4)
    join(s, clock, "old", 3)  # 4 tokens: 1 block
    join(s, clock, "mid", 7)  # 8 tokens: 2 blocks
    join(s, clock, "young", 11)  # 12 tokens: 3 blocks; pool now full
    plan = s.schedule()
    s.postprocess(plan.batch, [9, 9, 9])  # each needs a new block now
    plan = s.schedule()
    assert plan.preempted == ["young"]
    assert [q.request_id for q in plan.batch] == ["old", "mid"]
    assert [len(q.block_ids) for q in plan.batch] == [2, 3]
    assert [q.request_id for q in s.running] == ["old", "mid"]
    assert s.allocator.num_free == 1


def test_the_youngest_preempts_itself_when_only_it_needs_a_block() -> None:
    s, clock = make(blocks=5, bs=4)
    join(s, clock, "old", 2)  # 3 tokens: 1 block, room for 2 more
    join(s, clock, "young", 15)  # 16 tokens: 4 blocks; pool now full
    plan = s.schedule()
    s.postprocess(plan.batch, [9, 9])  # only young needs a new block
    plan = s.schedule()
    assert plan.preempted == ["young"]
    assert [q.request_id for q in plan.batch] == ["old"]
    assert s.allocator.num_free == 4


def test_a_rejoined_request_is_not_preempted_again_while_a_younger_one_runs() -> None:
    """The victim is the youngest request by admission order, not the sequence that joined
    last: a preempted request rejoins with its order, and must not be the victim again
    (each preemption re-prefills its prompt + generated tokens) while a younger one runs."""
    s, clock = make(blocks=4, bs=4)
    join(s, clock, "young", 3, order=2)  # 4 tokens: 1 block
    # Admitted before "young", preempted, re-prefilled: it joins last.
    join(s, clock, "old", 11, order=1)  # 12 tokens: 3 blocks; pool now full
    plan = s.schedule()
    s.postprocess(plan.batch, [9, 9])  # both need a new block now
    plan = s.schedule()
    assert plan.preempted == ["young"]
    assert [q.request_id for q in plan.batch] == ["old"]


def test_a_step_never_compares_two_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sequences are entities: the scheduler tells them apart by identity. Comparing them by
    value made every step quadratic in the batch (15 ms a step at 256 sequences)."""
    s, clock = make(blocks=20, bs=4, max_seqs=32)
    for i in range(12):
        join(s, clock, f"r{i}", 3, max_tokens=3 + i % 3)

    def no_eq(self: DecodeSeq, other: object) -> bool:
        raise AssertionError("two sequences compared by value")

    monkeypatch.setattr(DecodeSeq, "__eq__", no_eq)
    preempted, finished = [], 0
    for _ in range(4):  # blocks run out on the way: preemption; max_tokens: finishing
        plan = s.schedule()
        preempted += plan.preempted
        outs = s.postprocess(plan.batch, [9] * len(plan.batch))
        finished += sum(o.finish_reason is not None for o in outs)
    assert preempted and finished


def test_release_in_every_state() -> None:
    s, clock = make()
    lease = s.reserve(res("r", 4))
    assert lease is not None
    join(s, clock, "ready", 4)
    join(s, clock, "run", 4)
    s.schedule()
    join(s, clock, "ready2", 4)
    for rid in ("r", "run", "ready2", "ready"):
        assert s.release(rid)
    assert not s.release("r")
    assert s.allocator.num_free == 16
    assert s.activate(lease.transfer_id, 1) is False  # a released lease stays gone


def test_colocated_prefill_chunks_then_joins() -> None:
    s, clock = make(blocks=16, bs=4)
    lease = s.reserve(res("c", 10))  # prompt of 10 tokens (+1 slot for the first token)
    assert lease is not None
    assert s.start_prefill(lease.transfer_id, list(range(10)))
    with pytest.raises(ValueError):
        s.start_prefill(lease.transfer_id, [1, 2])
    c1 = s.schedule_prefill(budget=6)
    assert [(c.start, len(c.token_ids), c.is_last) for c in c1] == [(0, 6, False)]
    assert s.prefilled(c1) == []
    c2 = s.schedule_prefill(budget=6)
    assert [(c.start, len(c.token_ids), c.is_last) for c in c2] == [(6, 4, True)]
    (seq,) = s.prefilled(c2)
    clock.t = 100.0
    assert s.expire() == []  # a lease being prefilled here has no KV to wait for
    assert s.activate(seq.transfer_id, 7)
    plan = s.schedule()
    assert [q.request_id for q in plan.batch] == ["c"] and plan.batch[0].last_token == 7
    assert s.release("c") and s.allocator.num_free == 16


def test_local_prefill_next_to_leases_awaiting_kv() -> None:
    """Conditional disaggregation: one worker holds leases whose KV comes over a channel and
    leases whose prompt it prefills itself; only the latter are chunked, only the former
    can expire."""
    s, clock = make(blocks=16, bs=4)
    assert s.schedule_prefill(budget=64) == []  # nothing submitted: a decode-only step
    remote, local = s.reserve(res("remote", 6)), s.reserve(res("local", 5))
    assert remote is not None and local is not None
    assert s.start_prefill(local.transfer_id, list(range(5)))
    chunks = s.schedule_prefill(budget=64)
    assert [(c.seq.request_id, c.start, len(c.token_ids)) for c in chunks] == [("local", 0, 5)]
    clock.t = 100.0
    assert s.expire() == [("remote", remote.transfer_id)]
    assert [q.request_id for q in s.prefilled(chunks)] == ["local"]
    assert s.activate(local.transfer_id, 7) and not s.activate(remote.transfer_id, 7)


def test_penalized_sequences_keep_their_history_across_a_preemption() -> None:
    """The counts the sampler builds come from prompt + output: the same whether the
    sequence ran straight through or was preempted and re-reserved with its tokens."""
    pen = SamplingParams(max_tokens=100, temperature=0.0, repetition_penalty=1.5,
                         frequency_penalty=0.5)
    prompt = (3, 4, 4, 7)
    s, _ = make()
    lease = s.reserve(Reservation("a", len(prompt), 0, pen, 0, prompt))
    assert lease is not None and s.activate(lease.transfer_id, 9)
    seq = s.schedule().batch[0]
    assert seq.history == [3, 4, 4, 7, 9]
    s.postprocess([seq], [11])
    assert seq.history == [3, 4, 4, 7, 9, 11] and seq.num_generated == 2
    # Preempted after two tokens: the router re-reserves prompt + output elsewhere; the
    # prefill side samples the third token from the same tokens, the decode side keeps on.
    s2, _ = make()
    tokens = (*prompt, 9, 11)
    again = s2.reserve(Reservation("a", len(tokens), 2, pen, 0, tokens))
    assert again is not None and s2.activate(again.transfer_id, 13)
    s.postprocess([seq], [13])
    resumed = s2.schedule().batch[0]
    assert resumed.history == seq.history and resumed.num_generated == seq.num_generated
    logits = torch.randn(1, 32)
    straight = sample_batch(logits, [pen], [seq.num_generated], [seq.history])
    after = sample_batch(logits, [pen], [resumed.num_generated], [resumed.history])
    assert straight.tokens == after.tokens
    plain = s2.reserve(Reservation("b", 4, 0, SamplingParams(), 1, ()))
    assert plain is not None
    held = s2.lease(plain.transfer_id)
    assert held is not None and held.history is None  # no penalties: no history kept
