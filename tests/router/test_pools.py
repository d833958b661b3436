"""Workers joining and leaving a running router (``router.pools``), against recording
stand-ins for the worker actors: channels to every peer before a joiner is placed on, no
placement on a draining worker, its attempts finished or migrated, then its channels closed
at both ends and its handle gone."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.engine.messages import StepReport, TokenOut
from pdserve.router import pools
from pdserve.router.request import Request, State
from pdserve_testing.router import FakeWorker, RouterSetup, settle


def _finish(s: RouterSetup, req: Request) -> None:
    """``req``'s first token from its prefill worker, then its last from its decode one."""
    s.first_token(req.prefill_worker or "decode-0", req)
    assert req.lease is not None
    s.router.on_step(StepReport(req.lease.worker, tokens=[
        TokenOut(req.request_id, req.lease.transfer_id, 66, "length")], num_free_blocks=100))


async def _with_second_decode(s: RouterSetup) -> FakeWorker:
    d1 = FakeWorker("decode-1")
    await pools.add_worker(s.router, "decode", "decode-1", d1)
    return d1


def test_a_joining_decode_worker_gets_channels_then_requests() -> None:
    async def main() -> None:
        s = RouterSetup()
        d1 = await _with_second_decode(s)
        # The channel from the one prefill worker opened (hosted by the joiner) first.
        assert [a[0] for a in d1.called("host_channel")] == ["prefill-0"]
        assert [a[0] for a in s.p.called("connect")] == ["decode-1"]
        assert ("prefill-0", "decode-1") in s.router.dispatcher.endpoints
        a = await s.admit("a", 4)
        b = await s.admit("b", 4)
        assert {a.lease.worker, b.lease.worker} == {"decode-0", "decode-1"}  # type: ignore[union-attr]
        assert s.value("pdserve:num_workers", role="decode", state="serving") == 2
        with pytest.raises(ValueError, match="already"):
            await pools.add_worker(s.router, "decode", "decode-1", d1)

    asyncio.run(main())


def test_a_drained_worker_finishes_its_requests_first() -> None:
    async def main() -> None:
        s = RouterSetup()
        await _with_second_decode(s)
        req = await s.admit("r", 4)
        victim = req.lease.worker  # type: ignore[union-attr]
        other = "decode-1" if victim == "decode-0" else "decode-0"
        drain = asyncio.ensure_future(pools.drain(s.router, victim, timeout_s=60.0))
        await settle()
        assert not drain.done()  # r still runs there
        assert victim not in s.router.dispatcher.d_load
        assert s.value("pdserve:num_workers", role="decode", state="draining") == 1
        late = await s.admit("late", 4)  # a new request goes to the other worker
        assert late.lease is not None and late.lease.worker == other
        _finish(s, req)
        drained = await asyncio.wait_for(drain, 5.0)
        assert (drained.name, drained.role, drained.finished, drained.migrated) == \
            (victim, "decode", 1, 0)
        assert req.state == State.FINISHED
        assert victim not in s.router.decode and victim not in s.router.dispatcher.draining
        assert ("disconnect", (victim,)) in s.p.calls  # both ends of its channel closed
        assert ("prefill-0", victim) not in s.router.dispatcher.endpoints
        assert s.value("pdserve:num_workers", role="decode", state="serving") == 1
        assert s.value("pdserve:num_workers", role="decode", state="draining") == 0

    asyncio.run(main())


def test_what_outlasts_the_drain_timeout_migrates() -> None:
    async def main() -> None:
        s = RouterSetup()
        d1 = await _with_second_decode(s)
        d = s.router.dispatcher
        d.start_draining("decode-1")  # r goes to decode-0 ...
        req = await s.admit("r", 4)
        d.d_load["decode-1"] = d.draining.pop("decode-1")  # ... and decode-1 serves again
        s.first_token("prefill-0", req)
        assert req.lease is not None and req.lease.worker == "decode-0"
        old = req.lease.transfer_id
        drained = await pools.drain(s.router, "decode-0", timeout_s=0.0)
        await settle()
        assert drained.migrated == 1 and drained.finished == 0
        # Re-prefilled with the token it streamed, under a lease on decode-1; not a failure.
        assert req.lease is not None and req.lease.worker == "decode-1"
        assert req.lease.transfer_id != old and req.failures == 0
        assert req.state == State.PREFILLING and req.output_ids == [65]
        assert [a[0].request_id for a in d1.called("reserve")] == ["r"]
        assert [a[0].token_ids for a in s.p.called("submit")][-1][-1] == 65

    asyncio.run(main())


def test_a_pool_keeps_its_last_worker() -> None:
    async def main() -> None:
        s = RouterSetup()
        with pytest.raises(ValueError, match="last serving prefill worker"):
            await pools.drain(s.router, "prefill-0", 1.0)
        with pytest.raises(ValueError, match="last serving decode worker"):
            await pools.drain(s.router, "decode-0", 1.0)
        with pytest.raises(ValueError, match="no worker named 'decode-9'"):
            await pools.drain(s.router, "decode-9", 1.0)
        with pytest.raises(ValueError, match="role"):
            await pools.add_worker(s.router, "router", "x", FakeWorker("x"))

    asyncio.run(main())


def test_the_load_snapshot_counts_pools_arrivals_and_attainment() -> None:
    async def main() -> None:
        t = [100.0]
        s = RouterSetup(clock=lambda: t[0])
        await _with_second_decode(s)
        reqs = []
        for i in range(4):
            reqs.append(await s.admit(f"r{i}", 10))
            t[0] += 1.0
        for r in reqs:
            _finish(s, r)
        snap = pools.load_snapshot(s.router)
        assert snap.serving == {"prefill": 1, "decode": 2}
        assert snap.draining == {"prefill": 0, "decode": 0}
        assert snap.arrival_rate > 0 and snap.prompt_token_rate == pytest.approx(
            10 * snap.arrival_rate)
        assert snap.mean_output_tokens == 2 and snap.mean_context_tokens == 12
        assert snap.ttft_attainment is None  # no objectives
        assert snap.waiting == 0 and snap.queued_prompt_tokens == 0

    asyncio.run(main())


class _Dying(FakeWorker):
    """A worker whose liveness watch fails when ``die()`` is called (its process gone)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.gone: asyncio.Future[None] | None = None

    def __getattr__(self, method: str) -> object:
        if method != "watch":
            return super().__getattr__(method)
        worker = self

        class Watch:
            def remote(self) -> asyncio.Future[None]:
                worker.gone = asyncio.get_running_loop().create_future()
                return worker.gone

        return Watch()

    def die(self) -> None:
        assert self.gone is not None
        self.gone.set_exception(RuntimeError("the actor died"))


def test_a_dead_worker_s_requests_are_re_dispatched_and_it_leaves() -> None:
    async def main() -> None:
        s = RouterSetup()
        d1 = _Dying("decode-1")
        await pools.add_worker(s.router, "decode", "decode-1", d1)
        d = s.router.dispatcher
        d.start_draining("decode-0")  # r goes to decode-1 ...
        req = await s.admit("r", 4)
        d.d_load["decode-0"] = d.draining.pop("decode-0")  # ... and decode-0 serves again
        s.first_token("prefill-0", req)
        assert req.lease is not None and req.lease.worker == "decode-1"
        d1.die()
        await settle()
        await settle()
        # Re-prefilled (prompt + the streamed token) under a lease on decode-0, counted as a
        # failed attempt; decode-1 is out of the router.
        assert req.lease is not None and req.lease.worker == "decode-0"
        assert req.failures == 1 and req.output_ids == [65] and not req.done
        assert "decode-1" not in s.router.decode and "decode-1" not in d.d_load
        assert s.value("pdserve:num_workers", role="decode", state="serving") == 1
        assert await pools.worker_lost(s.router, "decode-1", "again") == []  # once only

    asyncio.run(main())


def test_the_last_worker_of_a_pool_dying_leaves_the_pool_empty_not_stuck() -> None:
    async def main() -> None:
        s = RouterSetup()
        req = await s.admit("r", 4)
        hit = await pools.worker_lost(s.router, "decode-0", "test")
        assert hit == [req] and req.state == State.QUEUED  # waits for a replacement
        assert s.router.dispatcher.d_load == {}
        d2 = FakeWorker("decode-2")
        await pools.add_worker(s.router, "decode", "decode-2", d2)
        await settle()
        assert req.lease is not None and req.lease.worker == "decode-2"

    asyncio.run(main())
