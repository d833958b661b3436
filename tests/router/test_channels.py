"""Broken KV channels (``router.channels``), against recording stand-ins for the workers: a
channel either end reports broken takes its pair out of placement until a fresh channel,
under a new name, is open at both ends; the request whose transfer broke is re-dispatched
over it; a report naming a channel replaced already changes nothing; reopening retries with
backoff, gives up after a bounded number of tries, and starts again when a worker of the
pair reports; a worker that dies takes its repair with it."""

from __future__ import annotations

import asyncio

from pdserve.engine.messages import StepReport, TransferDone
from pdserve.router import pools
from pdserve.router.channels import REPAIR_TRIES, Channels
from pdserve.router.request import Request, State
from pdserve_testing.router import RouterSetup, settle

PAIR = ("prefill-0", "decode-0")


def _broken_transfer(s: RouterSetup, req: Request, channel: str) -> None:
    assert req.lease is not None
    s.router.on_transfer_done(TransferDone(
        "prefill-0", req.request_id, req.lease.transfer_id, ok=False, seconds=0.0, nbytes=0,
        error="ChannelClosed: the decode end closed the channel", broken_channel=channel))


def _channels(s: RouterSetup) -> Channels:
    return s.router.dispatcher.channels


async def _repaired(ch: Channels) -> None:
    for _ in range(500):
        if not ch.repairing:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the repair did not end")


def test_a_broken_channel_is_reopened_and_its_request_goes_over_the_new_one() -> None:
    async def main() -> None:
        s = RouterSetup()
        req = await s.admit("r", 9)
        ch = _channels(s)
        (old,) = [a[3] for a in s.p.called("connect")]
        assert ch.names[PAIR] == old and old.startswith("prefill-0@decode-0:e")
        _broken_transfer(s, req, old)
        assert not ch.usable(*PAIR)  # out of placement at once
        assert req.state == State.QUEUED  # a failed attempt, back in the queue
        await settle()
        await _repaired(ch)
        await settle()
        new = ch.names[PAIR]
        assert new != old and [a[3] for a in s.p.called("connect")] == [old, new]
        assert ch.usable(*PAIR) and [(r.old, r.new) for r in ch.repairs] == [(old, new)]
        # Re-dispatched only once the fresh channel was in: connect, then the new submit.
        order = [name for name, _ in s.p.calls if name in ("connect", "submit")]
        assert order == ["connect", "submit", "connect", "submit"]
        assert req.state == State.PREFILLING and req.attempts == 2 and req.failures == 1
        # The other end's report of the same broken channel comes late: nothing happens.
        s.router.on_step(StepReport("decode-0", broken_channels=[old], num_free_blocks=100))
        await settle()
        assert len(s.d.called("host_channel")) == 2 and ch.names[PAIR] == new

    asyncio.run(main())


def test_the_decode_end_reporting_a_channel_that_ended_reopens_it() -> None:
    async def main() -> None:
        s = RouterSetup()
        await s.admit("r", 9)
        ch = _channels(s)
        old = ch.names[PAIR]
        s.router.on_step(StepReport("decode-0", broken_channels=[old], num_free_blocks=100))
        assert not ch.usable(*PAIR)
        queued = s.request("q", 5)
        s.router.admit(queued)
        await settle()
        await _repaired(ch)
        await settle()
        assert ch.names[PAIR] != old
        assert queued.state == State.PREFILLING  # placed once the pair was usable again
        assert queued.lease is not None and queued.prefill_worker == "prefill-0"

    asyncio.run(main())


def test_reopening_backs_off_gives_up_and_starts_again_when_a_worker_reports() -> None:
    async def main() -> None:
        s = RouterSetup()
        req = await s.admit("r", 9)
        ch = _channels(s)
        delays: list[float] = []

        async def no_wait(seconds: float) -> None:
            delays.append(seconds)

        ch.sleep = no_wait
        s.d.failing["host_channel"] = REPAIR_TRIES  # every try of the first round fails
        _broken_transfer(s, req, ch.names[PAIR])
        await settle()
        await _repaired(ch)
        assert len(s.d.called("host_channel")) == 1 + REPAIR_TRIES
        assert delays == sorted(delays) and delays[0] < delays[-1]  # growing, bounded
        assert PAIR in ch.given_up and not ch.usable(*PAIR)
        assert req.state == State.QUEUED  # waits: no pair of decode-0 is usable
        # decode-0 reports a step: alive and answering, so the pair is tried again.
        s.router.on_step(StepReport("decode-0", num_free_blocks=100))
        await settle()
        await _repaired(ch)
        await settle()
        assert ch.usable(*PAIR) and PAIR in ch.names and req.state == State.PREFILLING

    asyncio.run(main())


def test_a_worker_that_dies_takes_its_repair_with_it() -> None:
    async def main() -> None:
        s = RouterSetup()
        req = await s.admit("r", 9)
        ch = _channels(s)
        gate = asyncio.Event()

        async def held(seconds: float) -> None:
            await gate.wait()

        ch.sleep = held
        s.d.failing["host_channel"] = 100
        _broken_transfer(s, req, ch.names[PAIR])
        await settle()
        assert PAIR in ch.repairing
        await pools.worker_lost(s.router, "decode-0", "RayActorError")
        assert not ch.repairing and not ch.given_up and PAIR not in ch.names
        calls = len(s.d.called("host_channel"))
        gate.set()
        await settle()
        assert len(s.d.called("host_channel")) == calls  # no try after it left

    asyncio.run(main())
