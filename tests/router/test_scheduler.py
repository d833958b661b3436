"""The slo scheduler's pump against a decode worker whose running requests hold TPOT
objectives: harm to them holds a request back only while it can afford the wait (a fake
clock; the synthetic profile of test_placement: decode step 20 ms + 1 ms a sequence,
prefill step 10 ms + 1 ms a token)."""

from __future__ import annotations

import asyncio

from pdserve.engine.messages import StepReport
from pdserve.router.request import State
from pdserve.router.scheduler import DEFER_SHARE, LATE_WAIT
from pdserve.router.slo import ValidSlo
from pdserve_testing.router import RouterSetup, settle

from .test_placement import PROFILE

TIGHT = ValidSlo(None, 25.5)  # TPOT 25.5 ms: met at a batch of 5 (25 ms), missed at 6


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reserved(s: RouterSetup) -> list[str]:
    return [args[0].request_id for args in s.d.called("reserve")]


async def holding_tight(clock: Clock) -> RouterSetup:
    """A router whose decode worker runs 5 sequences, one of them with the TIGHT objective."""
    s = RouterSetup(profile=PROFILE, clock=clock)
    tight = await s.admit("tight", 10, TIGHT)
    s.first_token("prefill-0", tight)
    s.router.on_step(StepReport("decode-0", num_running=5, num_free_blocks=100))
    await settle()
    return s


def test_a_request_waits_for_harmless_room_only_while_it_can_afford_to() -> None:
    async def go() -> None:
        clock = Clock()
        s = await holding_tight(clock)
        # Predicted TTFT 20 ms (one prefill step of 10 tokens), under half of 100 ms; the
        # step it would join breaks "tight".
        patient = s.request("patient", 10, ValidSlo(100.0, None))
        s.router.admit(patient)
        await settle()
        assert reserved(s) == ["tight"] and patient.state == State.QUEUED
        # Time passes: once waiting more would use over DEFER_SHARE of its objective, the
        # pump the scheduler set for then places it all the same (no report comes).
        clock.now += DEFER_SHARE * 0.100 - 0.020 + 0.001
        for _ in range(100):  # the timer is due 10 ms after the first pump (loop time)
            await asyncio.sleep(0.01)
            if patient.state != State.QUEUED:
                break
        assert reserved(s) == ["tight", "patient"] and patient.state == State.PREFILLING

    asyncio.run(go())


def test_a_request_short_of_slack_is_placed_despite_the_harm() -> None:
    async def go() -> None:
        s = await holding_tight(Clock())
        await s.admit("hurried", 10, ValidSlo(30.0, None))  # 20 ms predicted >= 15 ms
        assert reserved(s) == ["tight", "hurried"]

    asyncio.run(go())


def test_a_request_that_harms_no_one_is_not_held_back() -> None:
    async def go() -> None:
        s = RouterSetup(profile=PROFILE, clock=Clock())
        await s.admit("loose", 10, ValidSlo(None, 100.0))
        s.router.on_step(StepReport("decode-0", num_running=5, num_free_blocks=100))
        await settle()
        await s.admit("next", 10, ValidSlo(100_000.0, None))

    asyncio.run(go())


def test_admission_adds_the_class_residual_learned_from_first_tokens() -> None:
    async def go() -> None:
        clock = Clock()
        s = RouterSetup(profile=PROFILE, clock=clock)
        first = await s.admit("first", 10, ValidSlo(1000.0, None))
        assert first.predicted_ttft_s is not None
        clock.now += first.predicted_ttft_s + 0.5  # its first token comes 0.5 s late
        s.first_token("prefill-0", first)
        learned = s.router.scheduler.residual.get(first.slo.class_name, clock.now)
        assert learned > 0.0
        second = await s.admit("second", 10, ValidSlo(1000.0, None))
        assert second.predicted_ttft_s == first.predicted_ttft_s + learned

    asyncio.run(go())


def test_a_late_request_waits_for_harmless_room_up_to_two_objectives() -> None:
    async def go() -> None:
        clock = Clock()
        s = await holding_tight(clock)
        clock.now -= 0.030  # it arrived 30 ms ago (on a frontend): late for 20 ms
        late = s.request("late", 10, ValidSlo(20.0, None, best_effort=True))  # not refused
        clock.now += 0.030
        s.router.admit(late)
        await settle()
        assert reserved(s) == ["tight"] and late.state == State.QUEUED
        clock.now = late.arrival + LATE_WAIT * 0.020 + 0.001
        for _ in range(100):
            await asyncio.sleep(0.01)
            if late.state != State.QUEUED:
                break
        assert reserved(s) == ["tight", "late"]

    asyncio.run(go())
