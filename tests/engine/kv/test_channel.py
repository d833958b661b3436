"""The part both channel ends share (engine/kv/channel.py), on CPU (Gloo): a peer that went
away (closed on purpose or gone), waits that end on it, and closing."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from pdserve.engine.kv import ChannelClosed, KVReceiver, KVSender
from pdserve_testing.kv import SPEC, catch, make_header, make_layers, pair, send_blocks

KV_LOGGER = "pdserve.engine.kv"  # the package's logger: each module logs under it


def _peer_news(caplog: pytest.LogCaptureFixture) -> list[int]:
    """Levels of the records about the prefill end going away (whatever else is logged)."""
    return [r.levelno for r in caplog.records if "the prefill end" in r.getMessage()]


def test_idle_receiver_sees_a_closed_sender(decode_store: Any,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """The doorbell is a connection: when the prefill end goes away, an idle receiver learns
    it at once (ChannelClosed), instead of waiting out its timeout (TransferTimeout). A
    sender closed on purpose (shutdown) says goodbye: no warning on the decode side."""
    with pair(decode_store) as (tx, rx), caplog.at_level(logging.INFO, KV_LOGGER):
        tx.close(abort=True)
        with pytest.raises(ChannelClosed, match="the prefill end closed the channel"):
            rx.recv_header(timeout_s=60)
        assert rx.closed
    assert _peer_news(caplog) == [logging.INFO]


def test_idle_receiver_sees_a_dead_sender(decode_store: Any,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """A sender whose process died only leaves a closed connection: a warning."""
    with pair(decode_store) as (tx, rx), caplog.at_level(logging.INFO, KV_LOGGER):
        tx._end.bell.close()  # what the kernel does for a process that is gone
        with pytest.raises(ChannelClosed, match="the prefill end is gone"):
            rx.recv_header(timeout_s=60)
        assert rx.closed
    assert _peer_news(caplog) == [logging.WARNING]


class _GpuWork:
    """Stands in for an NCCL work in the CUDA wait loop of ``ChannelEnd.wait`` (whose
    polling, deadline and peer checks are what these tests cover): it completes
    ``done_after_s`` after it is made, or never (on NCCL, a send or receive whose peer
    aborted its communicator never does)."""

    def __init__(self, done_after_s: float | None = None) -> None:
        self._at = None if done_after_s is None else time.monotonic() + done_after_s

    def is_completed(self) -> bool:
        return self._at is not None and time.monotonic() >= self._at

    def wait(self) -> None:
        assert self.is_completed()


def _gpu_wait(ch: KVSender | KVReceiver, work: _GpuWork,
              monkeypatch: pytest.MonkeyPatch) -> None:
    """``ch``'s channel end's wait on its CUDA path, with a 30 s deadline."""
    monkeypatch.setattr(ch._end, "is_cuda", True)
    ch._end.wait(work, time.monotonic() + 30, "transfer 7")


@pytest.mark.parametrize("goodbye", [True, False])
def test_a_wait_mid_transfer_ends_when_the_receiver_goes(
        decode_store: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        goodbye: bool) -> None:
    """The prefill end waits for a send that will never complete, because the decode end
    went away (it closed the channel at shutdown: goodbye; or it broke it: the connection
    just closes): the wait ends on the doorbell connection, not on its 30 s deadline, and
    only a broken channel is logged as a warning."""
    with pair(decode_store) as (tx, rx), caplog.at_level(logging.INFO, KV_LOGGER):
        if goodbye:
            rx.close(abort=True)
        else:
            rx._end.fail("test: a garbled trailer")
        want = "the decode end closed the channel" if goodbye else "the decode end is gone"
        with pytest.raises(ChannelClosed, match=f"transfer 7: {want}"):
            _gpu_wait(tx, _GpuWork(), monkeypatch)
        assert tx.closed
    levels = [r.levelno for r in caplog.records if "the decode end" in r.getMessage()]
    assert levels == [logging.INFO if goodbye else logging.WARNING]


def test_a_wait_mid_transfer_ends_when_the_sender_leaves(
        decode_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode end waits for data from a prefill end that shut down midway."""
    with pair(decode_store) as (tx, rx):
        tx.close(abort=True)
        with pytest.raises(ChannelClosed, match="the prefill end closed the channel"):
            _gpu_wait(rx, _GpuWork(), monkeypatch)


def test_a_sender_to_a_receiver_that_left_is_told_so_quietly(
        decode_store: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A decode worker shut down on purpose (scale-down): the prefill end's next transfer
    fails with the reason, as news, not as the transport's reset connection and a
    warning."""
    with pair(decode_store) as (tx, rx), caplog.at_level(logging.INFO, KV_LOGGER):
        rx.close()
        with pytest.raises(ChannelClosed, match="the decode end closed the channel"):
            send_blocks(tx, make_header(SPEC, 1, 2), make_layers(SPEC, 2, seed=1))
        assert tx.closed
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_work_that_lands_after_the_peer_left_still_counts(
        decode_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the peer sent before it went may still be landing: work that completes within
    the grace after the peer is seen gone ends the wait normally."""
    with pair(decode_store) as (tx, rx):
        tx.close()
        _gpu_wait(rx, _GpuWork(done_after_s=0.2), monkeypatch)
        assert not rx.closed


def test_a_header_waiting_on_the_doorbell_is_not_a_gone_peer(
        decode_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next transfer's header, in while the current one is waited for, is kept for
    recv_header(), and the peer is not taken for gone."""
    with pair(decode_store) as (tx, rx):
        tx.send_header(make_header(SPEC, 5, 1))
        _gpu_wait(rx, _GpuWork(done_after_s=0.1), monkeypatch)
        assert not rx.closed
        monkeypatch.setattr(rx._end, "is_cuda", False)
        assert rx.recv_header().transfer_id == 5


def test_closing_wakes_a_receiver_waiting_for_a_transfer(decode_store: Any) -> None:
    """Worker shutdown closes its channels from another thread: a receive loop waiting for
    the next transfer returns at once with ChannelClosed."""
    with pair(decode_store) as (_tx, rx), ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(catch(lambda: rx.recv_header(timeout_s=60)))
        time.sleep(0.2)  # let it block (the outcome does not depend on it)
        rx.close(abort=True)
        err = waiting.result(timeout=30)
    assert isinstance(err, ChannelClosed), err


def test_a_racing_close_returns_only_once_teardown_is_done(decode_store: Any) -> None:
    """The receive thread (dead peer) and worker shutdown may close one end at once: the
    second caller must not return while the first is still tearing the group down."""
    with pair(decode_store) as (_tx, rx), ThreadPoolExecutor(1) as pool:
        pg, in_abort, release = rx._end.pg, threading.Event(), threading.Event()
        torn_down: list[str] = []

        class SlowAbort:
            def abort(self) -> None:
                in_abort.set()
                release.wait(30)
                pg.abort()
                torn_down.append("abort")

            def __getattr__(self, name: str) -> Any:
                return getattr(pg, name)

        rx._end.pg = SlowAbort()
        first = pool.submit(lambda: rx.close(abort=True))
        assert in_abort.wait(30)
        second = threading.Thread(target=rx.close, kwargs={"abort": True})
        second.start()
        second.join(0.3)
        assert second.is_alive(), "the second close returned during the first's teardown"
        release.set()
        second.join(30)
        first.result(timeout=30)
        assert torn_down == ["abort"] and rx.closed
