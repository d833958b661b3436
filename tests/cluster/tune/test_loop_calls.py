"""The simulated clock (``tune.loop``) and the simulated Ray calls (``tune.calls``)."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.cluster.tune.calls import Network
from pdserve.cluster.tune.loop import SimLoop, Stalled


def test_the_clock_jumps_to_the_next_timer() -> None:
    loop = SimLoop(start=10.0)
    fired: list[float] = []

    async def main() -> float:
        loop.call_later(5.0, lambda: fired.append(loop.time()))
        await asyncio.sleep(3600.0)  # an hour, simulated
        return loop.time()

    try:
        assert loop.run_until_complete(main()) == pytest.approx(3610.0)
    finally:
        loop.close()
    assert fired == [pytest.approx(15.0)]


def test_waiting_on_nothing_scheduled_stalls() -> None:
    loop = SimLoop()

    async def main() -> None:
        await loop.create_future()  # nothing will ever resolve it

    try:
        with pytest.raises(Stalled):
            loop.run_until_complete(main())
    finally:
        loop.close()


class Target:
    def __init__(self, loop: SimLoop) -> None:
        self.loop = loop
        self.calls: list[tuple[int, float]] = []

    def record(self, i: int) -> int:
        self.calls.append((i, self.loop.time()))
        return i * 10

    def fail(self) -> None:
        raise ValueError("broken worker")


def test_calls_arrive_in_order_after_the_latency_and_replies_after_another() -> None:
    loop = SimLoop()
    net = Network(loop, latency_s=0.25)
    target = Target(loop)
    h = net.handle("router", "w", target)

    async def main() -> tuple[int, float]:
        for i in range(50):  # same due time: the order must still be the calls' order
            h.record.remote(i)
        reply = await h.record.remote(99)
        return reply, loop.time()

    try:
        reply, at = loop.run_until_complete(main())
    finally:
        loop.close()
    assert [i for i, _ in target.calls] == [*range(50), 99]
    assert all(t == pytest.approx(0.25) for _, t in target.calls)
    assert reply == 990 and at == pytest.approx(0.5)


def test_a_call_that_raises_stops_the_loop_and_is_kept() -> None:
    loop = SimLoop()
    net = Network(loop, latency_s=0.001)
    h = net.handle("router", "w", Target(loop))

    async def main() -> None:
        await h.fail.remote()

    try:
        with pytest.raises(RuntimeError):  # "Event loop stopped before Future completed."
            loop.run_until_complete(main())
    finally:
        loop.close()
    assert isinstance(net.error, ValueError) and "broken worker" in str(net.error)
