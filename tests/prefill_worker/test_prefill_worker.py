"""PrefillWorker's reports: a real worker on the tiny dummy model (CPU) and a router that only
records what it is told. Every request stops at its first token (max_tokens 1), so no KV
has to leave and no channel is needed."""

from __future__ import annotations

from pdserve.engine.messages import FirstToken, Lease, PrefillTask, StepTiming
from pdserve.engine.sequence import SamplingParams
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve_testing.workers import FakeRouter, wait_for, worker_config

ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def task(rid: str, n: int, transfer_id: int) -> PrefillTask:
    lease = Lease("decode-0", rid, transfer_id, 0, n // 4 + 1, 30.0)
    return PrefillTask(rid, tuple((7 * i) % 400 + 3 for i in range(n)), 0, ONE_TOKEN, lease)


def test_first_tokens_carry_their_step_once() -> None:
    """A 70-token prompt takes two steps under the 64-token budget (64, then 6 after 64
    cached); a 10-token prompt joins the second. That step is reported once, with the first
    prompt that finished in it: 16 tokens, attention 6 * 70 + 10 * 10."""
    router = FakeRouter()
    p = PrefillWorker("prefill-0", worker_config(), router)
    p.submit(task("long", 70, 1))
    p.submit(task("short", 10, 2))
    p.start()
    try:
        wait_for(lambda: len([c for c in list(router.calls) if c[0] == "on_first_token"]) == 2)
        firsts = [args[0] for name, args in router.calls if name == "on_first_token"]
        assert all(isinstance(f, FirstToken) and f.finish_reason == "length" for f in firsts)
        assert [f.request_id for f in firsts] == ["long", "short"]
        step = firsts[0].step
        assert isinstance(step, StepTiming)
        assert (step.tokens, step.attention) == (16, 6 * 70 + 10 * 10)
        assert step.seconds > 0
        assert firsts[1].step is None  # the same step: observed once
        wait_for(lambda: p.stats().num_free_blocks == p.stats().num_blocks)
    finally:
        p.shutdown()
