"""Router dispatch against recording stand-ins for the worker actors (no Ray): where each
prompt is prefilled, and the bookkeeping that follows it (queued prompt tokens, first
tokens, aborts, re-dispatch after preemption)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pdserve.engine.messages import FirstToken, StepReport, TransferDone
from pdserve.router.policy import LocalPrefillRule
from pdserve.router.request import State
from pdserve.router.router import deadline_callback, set_deadline
from pdserve_testing.router import FakeWorker, RouterSetup, settle


def test_short_prompts_prefill_on_their_decode_worker() -> None:
    async def main() -> None:
        s = RouterSetup(LocalPrefillRule(local_prefill_max_tokens=8))
        short = await s.admit("short", 8)
        assert short.prefill_worker == "" and s.queued == 0
        assert [t[0].request_id for t in s.d.called("submit")] == ["short"]
        assert s.p.called("submit") == [] and s.local_prefills == 1
        long = await s.admit("long", 9)
        assert long.prefill_worker == "prefill-0" and s.queued == 9
        assert [t[0].request_id for t in s.p.called("submit")] == ["long"]
        assert s.local_prefills == 1
        # The local prompt's first token comes from the decode worker: the prefill queue
        # is not touched; the remote one's releases its tokens.
        s.first_token("decode-0", short)
        assert short.state == State.TRANSFERRING and short.output_ids == [65]
        assert s.queued == 9
        s.first_token("prefill-0", long)
        assert s.queued == 0

    asyncio.run(main())


def test_a_backed_up_prefill_worker_spills_onto_the_decode_worker() -> None:
    async def main() -> None:
        s = RouterSetup(LocalPrefillRule(prefill_queue_max_tokens=10))
        first = await s.admit("first", 11)  # the queue is empty: remote
        assert first.prefill_worker == "prefill-0" and s.queued == 11
        second = await s.admit("second", 11)  # 11 queued > 10: local
        assert second.prefill_worker == "" and s.queued == 11 and s.local_prefills == 1
        s.first_token("prefill-0", first)
        assert s.queued == 0
        third = await s.admit("third", 11)
        assert third.prefill_worker == "prefill-0" and s.local_prefills == 1

    asyncio.run(main())


def test_plain_disaggregation_never_prefills_locally() -> None:
    async def main() -> None:
        s = RouterSetup(LocalPrefillRule())
        for i, n in enumerate((1, 100, 1000)):
            req = await s.admit(f"r{i}", n)
            assert req.prefill_worker == "prefill-0"
        assert s.d.called("submit") == [] and s.local_prefills == 0 and s.queued == 1101

    asyncio.run(main())


def test_preempted_request_is_redispatched_by_the_same_rule() -> None:
    async def main() -> None:
        s = RouterSetup(LocalPrefillRule(prefill_queue_max_tokens=10))
        req = await s.admit("r", 11)
        assert req.prefill_worker == "prefill-0"
        s.first_token("prefill-0", req)
        await s.admit("backlog", 11)  # now 11 tokens queued on the prefill worker
        assert s.queued == 11
        assert req.lease is not None
        old = req.lease.transfer_id
        s.router.on_step(StepReport("decode-0", preempted=["r"], num_free_blocks=100))
        await settle()
        # Prompt + the token generated before, prefilled on the decode worker this time.
        assert req.state == State.PREFILLING and req.prefill_worker == ""
        assert req.lease is not None and req.lease.transfer_id != old
        task = s.d.called("submit")[-1][0]
        assert task.request_id == "r" and list(task.token_ids) == [*range(3, 14), 65]
        assert task.num_generated == 1 and s.local_prefills == 1 and s.queued == 11
        assert ("r", old) in s.d.called("abort")

    asyncio.run(main())


def test_abort_of_a_local_prefill_goes_to_the_decode_worker_only() -> None:
    async def main() -> None:
        s = RouterSetup(LocalPrefillRule(local_prefill_max_tokens=8))
        req = await s.admit("r", 4)
        assert req.lease is not None
        assert s.router.abort("r")
        assert s.p.called("abort") == []
        assert ("r", req.lease.transfer_id) in s.d.called("abort")
        assert req.state == State.ABORTED

    asyncio.run(main())


def test_queued_tokens_released_on_abort_and_failed_prefill_step() -> None:
    """A prompt that leaves the prefill queue without a first token must not stay counted:
    the backed-up rule would send prompts local for good."""
    async def main() -> None:
        s = RouterSetup(LocalPrefillRule(prefill_queue_max_tokens=10))
        req = await s.admit("r", 11)
        assert s.queued == 11
        assert s.router.abort("r")
        assert s.p.called("abort") == [("r",)] and s.queued == 0
        s.first_token("prefill-0", req)  # the prefill finished before the abort landed
        assert s.queued == 0
        failed = await s.admit("failed", 11)
        assert failed.prefill_worker == "prefill-0" and s.queued == 11
        assert failed.lease is not None
        s.router.on_transfer_done(TransferDone("prefill-0", "failed", failed.lease.transfer_id,
                                               False, 0.0, 0, "boom"))
        assert s.queued == 0
        await settle()  # re-dispatched, to the empty prefill queue
        assert failed.prefill_worker == "prefill-0" and s.queued == 11

    asyncio.run(main())


class SlowAbortDecode(FakeWorker):
    """A decode worker whose aborts complete only when the test says so, and which refuses a
    lease to a request that still holds one (as DecodeScheduler.reserve does)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.held: set[str] = set()
        self.aborts: list[tuple[str, asyncio.Future[Any]]] = []

    def __getattr__(self, method: str) -> Any:
        if method not in ("reserve", "abort"):
            return super().__getattr__(method)
        worker = self

        class Method:
            def remote(self, *args: Any) -> asyncio.Future[Any]:
                worker.calls.append((method, args))
                fut = asyncio.get_running_loop().create_future()
                if method == "abort":
                    worker.aborts.append((args[0], fut))
                elif args[0].request_id in worker.held:
                    fut.set_exception(ValueError(
                        f"request {args[0].request_id} already holds a lease here"))
                else:
                    worker.held.add(args[0].request_id)
                    fut.set_result(worker.reply(method, args))
                return fut

        return Method()

    def finish_aborts(self) -> None:
        for rid, fut in self.aborts:
            self.held.discard(rid)
            fut.set_result(True)
        self.aborts.clear()


def test_a_retry_reserves_only_once_the_failed_attempts_lease_is_gone() -> None:
    """A failed transfer re-dispatches the request; its new reserve waits for the abort of
    the old lease (a concurrent decode actor could run the reserve first and refuse it)."""
    async def main() -> None:
        s = RouterSetup(LocalPrefillRule())
        s.d = SlowAbortDecode("decode-0")
        s.router.decode["decode-0"] = s.d
        req = await s.admit("r", 9)
        assert req.lease is not None
        s.router.on_transfer_done(TransferDone("prefill-0", "r", req.lease.transfer_id,
                                               ok=False, seconds=0.0, nbytes=0,
                                               error="channel broke"))
        await settle()
        assert len(s.d.called("reserve")) == 1 and req.state == State.QUEUED
        s.d.finish_aborts()
        await settle()
        assert len(s.d.called("reserve")) == 2
        assert req.state == State.PREFILLING and req.attempts == 2 and req.lease is not None

    asyncio.run(main())


@pytest.mark.parametrize("decode_first", [False, True])
@pytest.mark.parametrize("settle_between", [False, True])
def test_a_broken_transfer_reported_by_both_ends_is_retried_once(
    decode_first: bool, settle_between: bool
) -> None:
    """The prefill worker's TransferDone(ok=False) and the decode worker's failed entry tell
    of the same attempt: the second one, whenever it lands, must not re-queue the request."""
    async def main() -> None:
        s = RouterSetup(LocalPrefillRule())
        req = await s.admit("r", 9)
        assert req.lease is not None
        old = req.lease.transfer_id
        reports = [
            lambda: s.router.on_transfer_done(TransferDone(
                "prefill-0", "r", old, ok=False, seconds=0.0, nbytes=0, error="broke")),
            lambda: s.router.on_step(StepReport(
                "decode-0", failed=[("r", old, "KV transfer failed: broke")],
                num_free_blocks=100)),
        ]
        if decode_first:
            reports.reverse()
        reports[0]()
        if settle_between:
            await settle()
        reports[1]()
        await settle()
        assert req.state == State.PREFILLING and req.attempts == 2
        assert req.lease is not None and req.lease.transfer_id != old
        assert len(s.d.called("reserve")) == 2 and len(s.p.called("submit")) == 2
        assert not s.router.waiting and s.queued == 9

    asyncio.run(main())


def test_a_retry_aborts_the_old_attempt_on_its_prefill_worker() -> None:
    """A lease that expired while its prompt still waited on the prefill worker: the retry
    drops that attempt there (by its transfer id) and from the queued-token count."""
    async def main() -> None:
        s = RouterSetup(LocalPrefillRule())
        req = await s.admit("r", 9)
        assert req.lease is not None and s.queued == 9
        old = req.lease.transfer_id
        s.router.on_step(StepReport("decode-0", failed=[("r", old, "lease expired")],
                                       num_free_blocks=100))
        await settle()
        assert ("r", old) in s.p.called("abort")
        assert req.attempts == 2 and req.lease is not None and req.lease.transfer_id != old
        assert s.queued == 9  # the new attempt's prompt only
        s.first_token("prefill-0", req)
        assert s.queued == 0

    asyncio.run(main())


@pytest.mark.parametrize("end", ["finish", "abort", "fail"])
def test_a_deadline_timer_is_cancelled_however_its_request_ends(end: str) -> None:
    """A timer left running would kill a later request that reuses the id."""
    async def main() -> None:
        s = RouterSetup(LocalPrefillRule())
        req = await s.admit("r", 4)
        set_deadline(s.router, req, 3600.0)
        timer = req.deadline_timer
        assert timer is not None and not timer.cancelled()
        assert req.lease is not None
        if end == "finish":
            s.router.on_first_token(FirstToken("prefill-0", "r", req.lease.transfer_id, 65,
                                               "length", 0.0, 0.0))
        elif end == "abort":
            assert s.router.abort("r")
        else:
            s.router.abort_all("shutting down")
        assert req.done and timer.cancelled()

    asyncio.run(main())


def test_an_old_deadline_does_not_end_a_new_request_with_the_same_id() -> None:
    async def main() -> None:
        s = RouterSetup(LocalPrefillRule())
        old = await s.admit("r", 4)
        expire_old = deadline_callback(s.router, old)
        assert s.router.abort("r")
        new = await s.admit("r", 4)
        expire_old()
        assert not new.done and s.router.requests["r"] is new
        set_deadline(s.router, new, 0.0)
        for _ in range(1000):  # until the timer ran
            if new.done:
                break
            await asyncio.sleep(0.001)
        assert new.state == State.FAILED
        req, chunk = s.out[-1]
        assert req is new and chunk.error is not None and chunk.error[0] == "DEADLINE_EXCEEDED"

    asyncio.run(main())


def test_preemptions_do_not_count_against_max_attempts() -> None:
    """The decode worker may preempt a request more often than max_attempts (each time it
    rejoins, a younger request may take its blocks): the request still completes, with the
    admission order it got once; only failed attempts count."""
    async def main() -> None:
        s = RouterSetup(LocalPrefillRule(), max_attempts=2)
        req = await s.admit("r", 4)
        other = await s.admit("other", 4)
        for _ in range(3):
            s.first_token("prefill-0", req)
            s.router.on_step(StepReport("decode-0", preempted=["r"], num_free_blocks=100))
            await settle()
            assert req.state == State.PREFILLING, s.out[-1][1].error
        assert req.attempts == 4
        orders = [r[0].order for r in s.d.called("reserve") if r[0].request_id == "r"]
        assert orders == [req.order] * 4 and other.order > req.order
        assert req.lease is not None
        s.router.on_first_token(FirstToken("prefill-0", "r", req.lease.transfer_id, 66,
                                           "length", 0.0, 0.0))
        assert req.state == State.FINISHED and req.output_ids == [65, 65, 65, 66]
        # Failures still count: two of them end the other request.
        for _ in range(2):
            assert other.lease is not None
            s.router.on_transfer_done(TransferDone("prefill-0", "other", other.lease.transfer_id,
                                                   ok=False, seconds=0.0, nbytes=0, error="x"))
            await settle()
        assert other.state == State.FAILED
        assert s.out[-1][1].error == ("UNAVAILABLE",
                                      "request failed after 2 failed attempts: "
                                      "KV transfer failed: x")

    asyncio.run(main())
