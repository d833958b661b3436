"""The wait queue's order: priority, then TTFT deadline (EDF), late and objective-less
requests after; FIFO keeps arrival order with retries in front."""

from __future__ import annotations

from pdserve.engine.sequence import SamplingParams
from pdserve.router.request import Request
from pdserve.router.slo import ValidSlo
from pdserve.router.waiting import WaitQueue
from pdserve_testing.detok import CharDetok


def req(rid: str, arrival: float, ttft_ms: float | None, priority: int = 0,
        order: int = 0) -> Request:
    r = Request(rid, [1, 2], SamplingParams(), (), ValidSlo(ttft_ms, None, "c", priority),
                arrival, CharDetok())  # type: ignore[arg-type]
    r.order = order
    return r


def ids(rs: list[Request]) -> list[str]:
    return [r.request_id for r in rs]


def test_edf_within_priority_then_late_then_no_objective() -> None:
    q = WaitQueue("slo")
    q.push(req("loose", 0.0, 5000, order=1))  # due at 5.0
    q.push(req("none", 0.0, None, order=2))
    q.push(req("tight", 1.0, 1000, order=3))  # due at 2.0
    q.push(req("late", 0.0, 500, order=4))  # due at 0.5: passed at t=1.5
    q.push(req("vip", 1.2, 9000, priority=1, order=5))
    assert ids(q.ordered(1.5)) == ["vip", "tight", "loose", "late", "none"]
    # Before the late one's deadline passed, it came first among priority 0.
    assert ids(q.ordered(0.1)) == ["vip", "late", "tight", "loose", "none"]


def test_ahead_of_counts_only_what_is_served_first() -> None:
    q = WaitQueue("slo")
    a, b = req("a", 0.0, 1000, order=1), req("b", 0.0, 3000, order=2)
    q.push(a)
    q.push(b)
    new = req("new", 0.5, 1000, order=3)  # due at 1.5: after a (1.0), before b (3.0)
    assert ids(q.ahead_of(new, 0.6)) == ["a"]
    assert ids(q.ahead_of(req("low", 0.5, None), 0.6)) == ["a", "b"]


def test_fifo_keeps_arrival_order_and_puts_retries_first() -> None:
    q = WaitQueue("fifo")
    for i, ttft in enumerate((5000, 100, None)):
        q.push(req(f"r{i}", float(i), ttft, order=i))
    retry = req("retry", 0.0, None)
    q.push_retry(retry)
    assert ids(q.ordered(10.0)) == ["retry", "r0", "r1", "r2"]
    assert ids(q.ahead_of(retry, 10.0)) == ["r0", "r1", "r2"]
    q.remove(retry)
    assert retry not in q and len(q) == 3


def test_prune_drops_ended_requests() -> None:
    from pdserve.router.request import State

    q = WaitQueue("slo")
    a, b = req("a", 0.0, 100), req("b", 0.0, 100)
    q.push(a)
    q.push(b)
    a.state = State.ABORTED
    q.prune()
    assert ids(list(q)) == ["b"]
