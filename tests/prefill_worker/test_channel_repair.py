"""A cut KV channel between real workers (the tiny dummy model, CPU, a real Gloo channel)
and a router that only records what it is told: both ends report the channel by name (the
decode end in its next step report, the prefill end in the failed transfer's
``TransferDone``), and a fresh channel under a new name, carrying the decode worker's epoch,
replaces the broken one at both ends, over which requests go through again."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.messages import Lease, PrefillTask, Reservation, StepReport, TransferDone
from pdserve.engine.sequence import SamplingParams
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve_testing.workers import FakeRouter, wait_for, worker_config

EPOCH = 3
THREE = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
_order = itertools.count()


@pytest.fixture
def workers() -> Iterator[tuple[PrefillWorker, DecodeWorker, FakeRouter, FakeRouter]]:
    cfg = worker_config()  # one config: both workers hold the same deployment secret
    prouter, drouter = FakeRouter(), FakeRouter()
    p = PrefillWorker("prefill-0", cfg, prouter)
    d = DecodeWorker("decode-0", cfg, drouter, epoch=EPOCH)
    p.start()
    d.start()
    yield p, d, prouter, drouter
    p.shutdown()
    d.shutdown()


def _connect(p: PrefillWorker, d: DecodeWorker) -> str:
    """What the router does to open (or reopen) the pair; the channel's name."""
    host, port, name = d.host_channel(p.name)
    p.connect(d.name, host, port, name)
    wait_for(lambda: d.channels().get(p.name) == (name, True))
    assert p.channels() == {d.name: (name, True)}
    return name


def _send(p: PrefillWorker, d: DecodeWorker, prouter: FakeRouter, rid: str
          ) -> tuple[Lease, TransferDone]:
    """Lease on the decode worker, prefill on the prefill worker; its TransferDone."""
    prompt = tuple((5 * i) % 300 + 3 for i in range(20))
    lease = d.reserve(Reservation(rid, len(prompt), 0, THREE, next(_order)))
    assert lease is not None and lease.epoch == EPOCH
    p.submit(PrefillTask(rid, prompt, 0, THREE, lease))

    def done() -> list[TransferDone]:
        return [args[0] for name, args in list(prouter.calls)
                if name == "on_transfer_done" and args[0].request_id == rid]

    wait_for(lambda: bool(done()))
    return lease, done()[0]


def _decoded(drouter: FakeRouter, rid: str) -> bool:
    return any(t.request_id == rid and t.finish_reason for r in _steps(drouter)
               for t in r.tokens)


def _steps(drouter: FakeRouter) -> list[StepReport]:
    return [args[0] for name, args in list(drouter.calls) if name == "on_step"]


def _reported_broken(drouter: FakeRouter) -> list[str]:
    return [n for r in _steps(drouter) for n in r.broken_channels]


def test_a_cut_channel_is_reported_and_replaced_at_both_ends(
        workers: tuple[PrefillWorker, DecodeWorker, FakeRouter, FakeRouter]) -> None:
    p, d, prouter, drouter = workers
    first = _connect(p, d)
    assert first.startswith(f"prefill-0@decode-0:e{EPOCH}.")
    _, ok = _send(p, d, prouter, "a")
    assert ok.ok and ok.broken_channel == ""
    wait_for(lambda: _decoded(drouter, "a"))

    # Cut at the decode end: its receiver ends, and the next step report names the channel.
    assert d.close_channel(p.name)
    wait_for(lambda: first in _reported_broken(drouter))
    assert p.name not in d.channels()
    # The prefill end learns at its next transfer, before anything of it moves.
    lease, failed = _send(p, d, prouter, "b")
    assert not failed.ok and failed.broken_channel == first
    assert d.abort("b", lease.transfer_id)  # the router's retry frees the failed lease

    # The router reopens the pair: a new name, the same epoch; it replaces the old channel.
    second = _connect(p, d)
    assert second != first and second.startswith(f"prefill-0@decode-0:e{EPOCH}.")
    p.connect(d.name, "127.0.0.1", 1, second)  # the same channel again: nothing to do
    _, ok = _send(p, d, prouter, "c")
    assert ok.ok
    wait_for(lambda: _decoded(drouter, "c"))

    # Cut at the prefill end (its goodbye reaches the receiver): reported, reopened again.
    assert p.disconnect(d.name)
    wait_for(lambda: second in _reported_broken(drouter))
    third = _connect(p, d)
    _, ok = _send(p, d, prouter, "e")
    assert ok.ok and third not in (first, second)
    wait_for(lambda: _decoded(drouter, "e"))
    wait_for(lambda: d.stats().num_free_blocks == d.stats().num_blocks)
    wait_for(lambda: p.stats().num_free_blocks == p.stats().num_blocks)


def test_a_channel_that_broke_under_an_idle_prefill_end_is_replaced(
        workers: tuple[PrefillWorker, DecodeWorker, FakeRouter, FakeRouter]) -> None:
    """The prefill end still holds its (open-looking) end of a channel whose decode end is
    gone: connect with the fresh name replaces it all the same."""
    p, d, prouter, drouter = workers
    first = _connect(p, d)
    rx = d._channels.get(p.name)
    assert rx is not None
    rx.close(abort=True)  # the decode end breaks on its own (not through close_channel)
    wait_for(lambda: first in _reported_broken(drouter))
    assert p.channels() == {d.name: (first, True)}  # the prefill end has not noticed
    second = _connect(p, d)
    _, ok = _send(p, d, prouter, "a")
    assert ok.ok and second != first
    wait_for(lambda: _decoded(drouter, "a"))
