"""DecodeWorker with local prefill (colocated mode, conditional disaggregation): a real
worker on the tiny dummy model (CPU) and a router that only records what it is told."""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.messages import FirstToken, Lease, PrefillTask, Reservation, StepReport
from pdserve.engine.sequence import SamplingParams
from pdserve_testing.workers import FakeRouter, wait_for, worker_config

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def lease_and_task(d: DecodeWorker, rid: str, prompt: list[int]) -> tuple[Lease, PrefillTask]:
    lease = d.reserve(Reservation(rid, len(prompt), 0, GREEDY, 0))
    assert lease is not None
    return lease, PrefillTask(rid, tuple(prompt), 0, GREEDY, lease)


def test_decode_only_worker_refuses_prompts() -> None:
    d = DecodeWorker("decode-0", worker_config(), FakeRouter())
    _, task = lease_and_task(d, "r", [5, 6, 7])
    with pytest.raises(RuntimeError, match="local_prefill"):
        d.submit(task)


def test_local_prefill_reports_first_token_then_decodes() -> None:
    router = FakeRouter()
    d = DecodeWorker("decode-0", dataclasses.replace(worker_config(), local_prefill=True),
                     router)
    d.start()
    try:
        # 70 prompt tokens: two chunks under the 64-token step budget.
        lease, task = lease_and_task(d, "r", [(7 * i) % 400 + 3 for i in range(70)])
        d.submit(task)

        def tokens() -> list[str | None]:
            return [t.finish_reason for name, args in list(router.calls) if name == "on_step"
                    for t in args[0].tokens]

        wait_for(lambda: "length" in tokens())
        firsts = [args[0] for name, args in router.calls if name == "on_first_token"]
        assert len(firsts) == 1 and isinstance(firsts[0], FirstToken)
        assert (firsts[0].worker, firsts[0].transfer_id) == ("decode-0", lease.transfer_id)
        assert tokens() == [None, None, "length"]  # max_tokens 4, the first one included
        assert firsts[0].step is None  # local prefill: its chunks are in the step reports
        reports = [args[0] for name, args in router.calls if name == "on_step"]
        assert all(isinstance(r, StepReport) and not r.failed for r in reports)
        # The prompt's two chunks (64 from scratch, then 6 after 64 cached), and the decode
        # steps' context: prompt + first token (71), then one more each step.
        chunks = [(r.prefill_tokens, r.prefill_attention) for r in reports if r.prefill_tokens]
        assert chunks == [(64, 64 * 64), (6, 6 * 70)]
        assert [r.context_tokens for r in reports if r.tokens] == [71, 72, 73]
        assert all(r.num_waiting == 0 for r in reports if r.tokens)
        wait_for(lambda: d.stats().num_free_blocks == d.stats().num_blocks)
    finally:
        d.shutdown()


def test_an_arriving_transfer_is_checked_against_its_reservation() -> None:
    """The decode worker refuses a transfer unless its header matches the reservation
    (``match_header``): epoch, the prompt's token count and the blocks for it."""
    from pdserve.decode_worker.scheduler import DecodeSeq
    from pdserve.decode_worker.worker import _refusal
    from pdserve.engine.kv import TransferHeader

    seq = DecodeSeq("r0", SamplingParams(), block_ids=[4, 5, 6], num_tokens=40,
                    num_generated=0, transfer_id=9, deadline=0.0)  # 39 tokens of KV
    ok = TransferHeader(transfer_id=9, epoch=2, num_blocks=3, num_layers=2,
                        bytes_per_layer=64, num_tokens=39)
    assert _refusal(seq, ok, epoch=2, block_size=16) == ""
    assert "no reservation" in _refusal(None, ok, epoch=2, block_size=16)
    assert "epoch: got 2, expected 3" in _refusal(seq, ok, epoch=3, block_size=16)
    short = dataclasses.replace(ok, num_tokens=31, num_blocks=2)
    assert "num_blocks: got 2, expected 3; num_tokens: got 31, expected 39" in _refusal(
        seq, short, epoch=2, block_size=16)
    wrong_blocks = dataclasses.replace(ok, num_blocks=4)
    assert "num_blocks: got 4, expected 3" in _refusal(seq, wrong_blocks, epoch=2, block_size=16)


def test_a_new_lease_waits_for_the_old_attempt_s_deferred_abort() -> None:
    """An abort of an attempt that is in the running step is deferred to the step's end; a
    reserve for the same request meanwhile gets None (ask again later), not the error a
    second lease of one request would raise, and gets its lease once the abort ran."""
    d = DecodeWorker("decode-0", worker_config(), FakeRouter())  # no step loop: held still
    old = d.reserve(Reservation("r", 10, 0, GREEDY, 0))
    assert old is not None
    d._busy.add("r")  # the attempt is in the step that is running
    assert d.abort("r", old.transfer_id)
    assert d.reserve(Reservation("r", 10, 0, GREEDY, 0)) is None
    d._busy.discard("r")  # the step ended: the loop runs the deferred abort
    d._pending_abort.discard("r")
    d.sched.release("r")
    new = d.reserve(Reservation("r", 10, 0, GREEDY, 0))
    assert new is not None and new.transfer_id != old.transfer_id
    with pytest.raises(ValueError, match="already holds a lease"):
        d.sched.reserve(Reservation("r", 10, 0, GREEDY, 0))  # the guard the worker keeps
