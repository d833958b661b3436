"""Worker shutdown is bounded: real prefill and decode workers (the tiny dummy model, on CPU)
joined by a real Gloo KV channel, with the channel's process group standing in for NCCL's
teardown where it matters (a clean shutdown waits until the peer tears its end down too)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.kv import KVReceiver, KVSender
from pdserve.engine.kv.channel import ChannelEnd
from pdserve.engine.messages import Reservation
from pdserve.engine.sequence import SamplingParams
from pdserve.engine.teardown import SHUTDOWN_GRACE_S, abort_channels, join_threads
from pdserve.prefill_worker.worker import PrefillWorker
from pdserve_testing.workers import FakeRouter, wait_for, worker_config

PEER_WAIT_S = 6.0  # how long a clean teardown waits for the peer before the test gives up


class PeerWaitingPG:
    """Stands in for ProcessGroupNCCL around a real Gloo group: ``shutdown()`` (finalize,
    destroy) returns only once the peer's end was torn down too; ``abort()`` is local."""

    def __init__(self, pg: Any, mine: threading.Event, peer: threading.Event) -> None:
        self.pg, self.mine, self.peer = pg, mine, peer
        self.calls: list[str] = []

    def shutdown(self) -> None:
        self.calls.append("shutdown")
        self.mine.set()
        self.peer.wait(PEER_WAIT_S)

    def abort(self) -> None:
        self.calls.append("abort")
        self.mine.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pg, name)


@pytest.fixture
def workers() -> Iterator[tuple[PrefillWorker, DecodeWorker]]:
    cfg = worker_config()  # one config: both workers hold the same deployment secret
    p = PrefillWorker("prefill-0", cfg, FakeRouter())
    d = DecodeWorker("decode-0", cfg, FakeRouter())
    p.start()
    d.start()
    yield p, d
    p.shutdown()
    d.shutdown()


@pytest.fixture
def closes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, bool]]:
    """Every close of a channel end (either role's): (channel name, rank, abort)."""
    calls: list[tuple[str, int, bool]] = []
    close = ChannelEnd.close

    def recording_close(self: ChannelEnd, abort: bool = False) -> None:
        calls.append((self.name, self.rank, abort))
        close(self, abort=abort)

    monkeypatch.setattr(ChannelEnd, "close", recording_close)
    return calls


def connect(p: PrefillWorker, d: DecodeWorker) -> tuple[KVSender, KVReceiver]:
    host, port, name = d.host_channel(p.name)
    p.connect(d.name, host, port, name)
    wait_for(lambda: p.name in d._channels)
    entry = p._channels.get(d.name)
    rx = d._channels.get(p.name)
    assert entry is not None and rx is not None
    return entry[0], rx


def test_shutdown_aborts_channels_instead_of_waiting_for_the_peer(
        workers: tuple[PrefillWorker, DecodeWorker], caplog: pytest.LogCaptureFixture) -> None:
    """The launcher used to stop the prefill worker, then the decode worker: a clean
    teardown of the prefill end then waited on the decode end, which had not started its
    own (the ray.get timed out after 30 s). Neither end warns: the decode end hears the
    prefill end leave (a goodbye on the doorbell), or its own shutdown closed the channel."""
    caplog.set_level(logging.INFO)
    p, d = workers
    tx, rx = connect(p, d)
    tx_down, rx_down = threading.Event(), threading.Event()
    tx_pg = PeerWaitingPG(tx._end.pg, tx_down, rx_down)
    rx_pg = PeerWaitingPG(rx._end.pg, rx_down, tx_down)
    tx._end.pg, rx._end.pg = tx_pg, rx_pg
    for w in (p, d):  # one after the other, the decode worker last
        t0 = time.monotonic()
        w.shutdown()
        assert time.monotonic() - t0 < 2.0, f"{w.name} waited for its peer"
    assert tx_pg.calls == ["abort"] and rx_pg.calls == ["abort"]
    assert tx.closed and rx.closed
    assert not p._loop.is_alive() and not d._loop.is_alive()
    assert not p._sender.is_alive() and not p._finisher.is_alive()
    # The idle receiver leaves at the end of its doorbell wait.
    wait_for(lambda: not any(t.name == f"kv-recv-{p.name}" for t in threading.enumerate()),
             timeout_s=5.0)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_decode_loop_stops_with_sequences_running(monkeypatch: pytest.MonkeyPatch) -> None:
    d = DecodeWorker("decode-0", worker_config(decode_blocks=256), FakeRouter())
    d.start()
    decode = d.runner.decode

    def slow_decode(*args: Any) -> Any:  # keep the sequences running for seconds
        time.sleep(0.01)
        return decode(*args)

    monkeypatch.setattr(d.runner, "decode", slow_decode)
    for i in range(2):
        lease = d.reserve(Reservation(f"r{i}", 8, 0,
                                      SamplingParams(max_tokens=1000, ignore_eos=True), i))
        assert lease is not None
        with d._cv:
            assert d.sched.activate(lease.transfer_id, 5)
            d._cv.notify()
    wait_for(lambda: len(d.sched.running) == 2)
    t0 = time.monotonic()
    d.shutdown()
    assert time.monotonic() - t0 < 2.0
    assert not d._loop.is_alive()
    assert len(d.sched.running) == 2  # stopped mid-generation, not run to the end


def test_decode_channel_opened_after_shutdown_is_aborted(
        workers: tuple[PrefillWorker, DecodeWorker], closes: list[tuple[str, int, bool]]
) -> None:
    p, d = workers
    host, port, name = d.host_channel(p.name)  # opens on a thread once the prefill joins
    d.shutdown()
    p.connect(d.name, host, port, name)
    wait_for(lambda: (name, 1, True) in closes)
    assert d._channels.all() == []


def test_prefill_channel_opened_after_shutdown_is_aborted(
        workers: tuple[PrefillWorker, DecodeWorker], closes: list[tuple[str, int, bool]]
) -> None:
    p, d = workers
    host, port, name = d.host_channel(p.name)
    p.shutdown()
    p.connect(d.name, host, port, name)
    assert (name, 0, True) in closes
    assert p._channels.all() == []


def test_a_drained_peers_channel_closes_at_both_ends_at_once(
        workers: tuple[PrefillWorker, DecodeWorker], caplog: pytest.LogCaptureFixture) -> None:
    """A worker leaving the deployment (drained): the router closes both ends of each of
    its channels at the same time; neither waits for the other, neither warns (the receiver
    hears the goodbye), and the workers stay up for their other peers."""
    caplog.set_level(logging.INFO)
    p, d = workers
    tx, rx = connect(p, d)
    t0 = time.monotonic()
    closers = [threading.Thread(target=p.disconnect, args=(d.name,)),
               threading.Thread(target=d.close_channel, args=(p.name,))]
    for t in closers:
        t.start()
    for t in closers:
        t.join()
    assert time.monotonic() - t0 < 2.0
    assert tx.closed and rx.closed
    assert p._channels.get(d.name) is None and p.name not in d._channels
    assert not p.disconnect(d.name) and not d.close_channel(p.name)  # once only
    wait_for(lambda: not any(t.name == f"kv-recv-{p.name}" for t in threading.enumerate()),
             timeout_s=5.0)
    assert p._loop.is_alive() and d._loop.is_alive()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


class HangingChannel:
    """A channel whose teardown never returns."""

    name = "stuck"

    def __init__(self) -> None:
        self.release = threading.Event()

    def close(self, abort: bool = False) -> None:
        self.release.wait()


def test_abort_channels_is_bounded_by_its_deadline() -> None:
    stuck = HangingChannel()
    t0 = time.monotonic()
    left = abort_channels([stuck], time.monotonic() + 0.2)  # type: ignore[list-item]
    assert time.monotonic() - t0 < 1.0
    assert left == ["kv-abort-stuck"]
    stuck.release.set()


def test_join_threads_skips_threads_never_started() -> None:
    never = threading.Thread(target=lambda: None)
    assert join_threads([never], time.monotonic() + SHUTDOWN_GRACE_S) == []
