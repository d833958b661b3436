"""PrefillWorker's reports: a real worker on the tiny dummy model (CPU) and a router that only
records what it is told. Every request stops at its first token (max_tokens 1), so no KV
has to leave and no channel is needed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pdserve.engine.messages import FirstToken, Lease, PrefillTask, StepTiming
from pdserve.engine.sequence import SamplingParams
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve_testing.workers import FakeRouter, wait_for, worker_config

ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def task(rid: str, n: int, transfer_id: int, first: int = 3) -> PrefillTask:
    """``n`` tokens from ``first`` on (tasks of the same ``first`` share a prefix)."""
    lease = Lease("decode-0", rid, transfer_id, 0, n // 4 + 1, 30.0)
    return PrefillTask(rid, tuple((7 * i) % 400 + first for i in range(n)), 0, ONE_TOKEN,
                       lease)


def test_first_tokens_carry_their_step_once() -> None:
    """A 70-token prompt takes two steps under the 64-token budget (64, then 6 after 64
    cached); a 10-token prompt joins the second. That step is reported once, with the first
    prompt that finished in it: 16 tokens, attention 6 * 70 + 10 * 10 (the prompts share no
    prefix: nothing comes from the prefix cache)."""
    router = FakeRouter()
    p = PrefillWorker("prefill-0", worker_config(), router)
    p.submit(task("long", 70, 1))
    p.submit(task("short", 10, 2, first=5))
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


class _Sender:
    """A KV channel that sends nothing; its first layer calls ``on_first_layer``."""

    def __init__(self, spec: object, on_first_layer: Callable[[], None]) -> None:
        self.spec = spec
        self.name = "fake"
        self.closed = False
        self.cancelled = 0
        self._hook: Callable[[], None] | None = on_first_layer

    def send_header(self, header: object) -> None:
        pass

    def send_from_pool(self, pool: object, ids: object) -> None:
        hook, self._hook = self._hook, None
        if hook is not None:
            hook()

    def cancel(self) -> None:
        self.cancelled += 1

    def close(self, abort: bool = False) -> None:
        self.closed = True


def test_an_abort_during_the_last_prefill_step_frees_the_blocks_once() -> None:
    """The router aborts a request while the step that ends its prompt runs and its KV is
    already leaving layer by layer: the cancelled transfer frees the blocks, the orphan
    list must not free them a second time (a double free kills the step loop, or frees
    blocks another request holds by then)."""
    router = FakeRouter()
    p = PrefillWorker("prefill-0", worker_config(), router)
    sender = _Sender(p.channel_spec(), lambda: p.abort("gone"))
    p._channels.add("decode-0", sender)  # type: ignore[arg-type]
    p.start()
    try:
        p.submit(PrefillTask("gone", task("gone", 10, 1).token_ids, 0,
                             SamplingParams(max_tokens=8, ignore_eos=True),
                             task("gone", 10, 1).lease))
        wait_for(lambda: sender.cancelled == 1)
        p.submit(task("next", 10, 2))  # the step loop still serves
        wait_for(lambda: any(name == "on_first_token" and args[0].request_id == "next"
                             for name, args in list(router.calls)))
        wait_for(lambda: p.stats().num_free_blocks == p.stats().num_blocks)
        assert not any(name == "on_first_token" and args[0].request_id == "gone"
                       for name, args in list(router.calls))
    finally:
        p.shutdown()


def test_a_failed_step_with_a_stream_open_frees_the_blocks_once() -> None:
    """The forward pass fails after the first layer of a prompt's KV went out: the stream is
    cancelled (freeing the blocks), the request goes back to the router, and the blocks are
    not freed a second time by the failed step's cleanup."""
    router = FakeRouter()
    p = PrefillWorker("prefill-0", worker_config(), router)
    sender = _Sender(p.channel_spec(), lambda: None)
    p._channels.add("decode-0", sender)  # type: ignore[arg-type]
    real = p.runner.prefill
    failed = []

    def prefill_failing_once(items: Any, on_layer_done: Any = None) -> Any:
        if not failed:
            failed.append(True)
            if on_layer_done is not None:
                on_layer_done(0)
            raise RuntimeError("injected")
        return real(items, on_layer_done=on_layer_done)

    p.start()  # warms up with the real forward pass
    p.runner.prefill = prefill_failing_once  # type: ignore[method-assign]
    try:
        t = task("r", 10, 1)
        p.submit(PrefillTask("r", t.token_ids, 0, SamplingParams(max_tokens=8,
                                                                 ignore_eos=True), t.lease))
        wait_for(lambda: any(name == "on_transfer_done" and not args[0].ok
                             for name, args in list(router.calls)))
        assert sender.cancelled == 1
        p.submit(task("next", 10, 2))  # the step loop still serves
        wait_for(lambda: any(name == "on_first_token" and args[0].request_id == "next"
                             for name, args in list(router.calls)))
        wait_for(lambda: p.stats().num_free_blocks == p.stats().num_blocks)
    finally:
        p.shutdown()
