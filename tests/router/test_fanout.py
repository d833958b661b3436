"""n > 1 on the router (fake workers, no Ray): children named and seeded from the parent,
admitted all or none, placed beside their siblings, streamed apart; abort of the parent ends
every child, a failing child ends its siblings with its status, a finishing one does not."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from pdserve.engine.messages import StepReport, TokenLogprobs, TokenOut
from pdserve.engine.sequence import SamplingParams
from pdserve.router.fanout import Families, child_id, child_sampling, prefer
from pdserve.router.placement import Placement
from pdserve.router.request import Request, State
from pdserve.router.scheduler import Refused
from pdserve_testing.router import FakeWorker, RouterSetup, settle


def _children(s: RouterSetup, parent: str, n: int, sampling: SamplingParams) -> list[Request]:
    base = s.request(parent, 4)
    return [dataclasses.replace(base, request_id=child_id(parent, i),
                                sampling=child_sampling(sampling, i), parent=parent, index=i,
                                detok=type(base.detok)(), output_ids=[], early=[])
            for i in range(n)]


def test_children_are_named_and_seeded_from_the_parent() -> None:
    seeded = SamplingParams(seed=41)
    assert [child_id("r", i) for i in range(3)] == ["r-0", "r-1", "r-2"]
    assert [child_sampling(seeded, i).seed for i in range(3)] == [41, 42, 43]
    assert child_sampling(SamplingParams(seed=2**64 - 1), 1).seed == 0  # wraps like uint64
    plain = SamplingParams(temperature=0.0)
    assert child_sampling(plain, 2) is plain  # unseeded (greedy too): the same params


def test_families_admit_all_or_none() -> None:
    fam = Families()
    admitted: list[str] = []
    withdrawn: list[str] = []

    def admit(req: Request) -> None:
        if req.index == 2:
            raise Refused("queue full")
        admitted.append(req.request_id)

    s = RouterSetup()
    kids = _children(s, "p", 3, SamplingParams())
    with pytest.raises(Refused):
        fam.admit("p", kids, admit, lambda r: withdrawn.append(r.request_id))
    assert admitted == withdrawn == ["p-0", "p-1"] and "p" not in fam
    fam.admit("p", kids[:2], admit, lambda r: None)
    assert fam.children("p") == ["p-0", "p-1"] and fam.siblings("p-1") == ["p-0"]
    with pytest.raises(ValueError):
        fam.admit("p", kids[:2], admit, lambda r: None)
    fam.ended("p-0")
    fam.ended("p-1")
    assert "p" not in fam and fam.children("p") == []


def test_a_refused_child_leaves_none_of_its_call_queued() -> None:
    async def main() -> None:
        s = RouterSetup()
        s.router.cfg = dataclasses.replace(s.router.cfg, max_waiting=2)
        s.router.scheduler.cfg = s.router.cfg
        s.d.failing["reserve"] = 100  # nothing dispatches: all stay waiting
        kids = _children(s, "p", 3, SamplingParams())
        with pytest.raises(Refused):
            s.router.families.admit("p", kids, s.router.admit, s.router.withdraw)
        assert s.router.requests == {} and "p" not in s.router.families
        await settle()
        assert s.router.scheduler.num_waiting() == 0

    asyncio.run(main())


def _run_family(s: RouterSetup, n: int) -> list[Request]:
    kids = _children(s, "p", n, SamplingParams(max_tokens=3, logprobs=True))
    s.router.families.admit("p", kids, s.router.admit, s.router.withdraw)
    return kids


def test_children_stream_apart_and_share_a_decode_worker() -> None:
    async def main() -> None:
        s = RouterSetup()
        kids = _run_family(s, 3)
        await settle()
        assert all(k.state == State.PREFILLING for k in kids)
        assert {k.lease.worker for k in kids if k.lease} == {"decode-0"}
        lp = TokenLogprobs(-0.5, (65,), (-0.5,))
        for k in kids:
            assert k.lease is not None
            s.first_token("prefill-0", k, token=65 + k.index)
        s.router.on_step(StepReport("decode-0", tokens=[
            TokenOut(k.request_id, k.lease.transfer_id, 70, "length" if k.index == 0 else None,
                     lp)
            for k in kids if k.lease is not None]))
        assert kids[0].done and not kids[1].done and not kids[2].done  # a finish stays its own
        assert s.router.families.children("p") == ["p-1", "p-2"]
        by_child = {(r.request_id, tuple(c.token_ids)) for r, c in s.out}
        assert ("p-1", (66,)) in by_child and ("p-2", (70,)) in by_child
        last = [c for r, c in s.out if r is kids[0]][-1]
        assert last.finish_reason == "length" and last.logprobs == [lp]

    asyncio.run(main())


def test_aborting_the_parent_ends_every_child() -> None:
    async def main() -> None:
        s = RouterSetup()
        kids = _run_family(s, 3)
        await settle()
        assert s.router.abort(kids[1].request_id)  # one choice alone
        assert kids[1].state == State.ABORTED and not kids[0].done
        for cid in s.router.families.children("p"):
            s.router.abort(cid)
        assert all(k.state == State.ABORTED for k in kids) and "p" not in s.router.families
        aborted = {a[0] for a in s.d.called("abort")}
        assert aborted == {"p-0", "p-1", "p-2"}

    asyncio.run(main())


def test_a_failing_child_fails_its_siblings_with_its_status() -> None:
    async def main() -> None:
        s = RouterSetup()
        kids = _run_family(s, 3)
        await settle()
        s.router.abort(kids[2].request_id, "deadline exceeded", "DEADLINE_EXCEEDED")
        assert all(k.state == State.FAILED for k in kids)
        errors = [(r.request_id, c.error[0]) for r, c in s.out if c.error is not None]
        assert sorted(errors) == [("p-0", "DEADLINE_EXCEEDED"), ("p-1", "DEADLINE_EXCEEDED"),
                                  ("p-2", "DEADLINE_EXCEEDED")]
        assert s.router.requests == {} and "p" not in s.router.families

    asyncio.run(main())


def _placement(decode: str, harm: int = 0, feasible: bool = True) -> Placement:
    return Placement(decode, None, 0.1, 0.01, 0.2, feasible, 0.5, harm)


def test_prefer_takes_a_sibling_worker_only_as_good_as_the_best() -> None:
    a, b, c = _placement("a"), _placement("b"), _placement("c", harm=1)
    assert prefer([a, b], {"b"}) is b
    assert prefer([a, c], {"c"}) is None  # it would break a TPOT objective the best keeps
    assert prefer([a, b], set()) is None
    assert prefer([_placement("a", feasible=True), _placement("b", feasible=False)],
                  {"b"}) is None


@pytest.mark.parametrize("scheduler", ["fifo", "slo"])
def test_a_child_goes_to_its_siblings_decode_worker(scheduler: str) -> None:
    async def main() -> None:
        s = RouterSetup()
        await s.router.dispatcher.add("decode", "decode-1", FakeWorker("decode-1"))
        s.router.cfg = dataclasses.replace(s.router.cfg, scheduler=scheduler)
        s.router.scheduler.cfg = s.router.cfg
        loads = s.router.dispatcher.d_load
        for name, usage in (("decode-0", 0.0), ("decode-1", 0.5)):
            loads[name].report(0, 0, 100, usage, 0)
        first, second = _children(s, "p", 2, SamplingParams())
        s.router.admit(first)
        await settle()
        assert first.lease is not None and first.lease.worker == "decode-0"
        for name, usage in (("decode-0", 0.5), ("decode-1", 0.0)):  # now decode-1 is freer
            loads[name].report(0, 0, 100, usage, 0)
        other = s.request("other", 4)
        s.router.admit(other)
        s.router.admit(second)
        await settle()
        assert other.lease is not None and other.lease.worker == "decode-1"
        assert second.lease is not None and second.lease.worker == "decode-0"

    asyncio.run(main())
