"""The KV channel's doorbell connection (engine/kv/doorbell.py), on its own."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch.distributed as dist

from pdserve.engine.kv.doorbell import HEADER_BYTES, Doorbell, DoorbellError, PeerLeft
from pdserve.engine.secret import Secret
from pdserve_testing.kv import SECRET

HOST = "127.0.0.1"


def _connected(name: str = "chan") -> tuple[Doorbell, Doorbell]:
    ns = dist.HashStore()
    got: list[Doorbell] = []
    listener = threading.Thread(target=lambda: got.append(Doorbell.listen(ns, HOST, name, 10,
                                                                          SECRET)))
    listener.start()
    tx = Doorbell.connect(ns, name, 10, SECRET)
    listener.join(10)
    return tx, got[0]


@pytest.fixture
def pair() -> Iterator[tuple[Doorbell, Doorbell]]:
    tx, rx = _connected()
    yield tx, rx
    tx.close()
    rx.close()


def test_headers_arrive_in_order_and_whole(pair: tuple[Doorbell, Doorbell]) -> None:
    tx, rx = pair
    headers = [bytes([i]) * HEADER_BYTES for i in range(3)]
    for h in headers:  # rung back to back: the receiver hands them out one at a time
        tx.ring(h, 5)
    assert [rx.wait(5) for _ in headers] == headers


def test_a_header_split_across_waits_is_kept(pair: tuple[Doorbell, Doorbell]) -> None:
    tx, rx = pair
    header = bytes(range(HEADER_BYTES))
    tx._sock.sendall(header[:100])
    assert rx.wait(0.2) is None  # not all of it yet: an idle-looking wait
    tx._sock.sendall(header[100:])
    assert rx.wait(5) == header


def test_idle_wait_times_out_and_the_doorbell_still_works(
        pair: tuple[Doorbell, Doorbell]) -> None:
    tx, rx = pair
    assert rx.wait(0.1) is None
    tx.ring(b"\x07" * HEADER_BYTES, 5)
    assert rx.wait(5) == b"\x07" * HEADER_BYTES


def test_a_closed_sender_is_seen_at_once(pair: tuple[Doorbell, Doorbell]) -> None:
    tx, rx = pair
    tx.close()
    with pytest.raises(DoorbellError, match="closed"):
        rx.wait(30)  # raises on the closed connection; a timeout would return None


def test_a_sender_that_says_goodbye_is_told_apart(pair: tuple[Doorbell, Doorbell]) -> None:
    tx, rx = pair
    tx.ring(b"\x05" * HEADER_BYTES, 5)
    tx.close(goodbye=True)
    assert rx.wait(5) == b"\x05" * HEADER_BYTES  # what was rung before still arrives
    with pytest.raises(PeerLeft, match="closed its end"):
        rx.wait(30)


def test_a_sender_gone_without_goodbye_is_not_peer_left(
        pair: tuple[Doorbell, Doorbell]) -> None:
    tx, rx = pair
    tx.close()
    with pytest.raises(DoorbellError) as e:
        rx.wait(30)
    assert not isinstance(e.value, PeerLeft)


def test_close_wakes_a_waiting_receiver(pair: tuple[Doorbell, Doorbell]) -> None:
    _tx, rx = pair
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            rx.wait(30)
        except BaseException as e:
            errors.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    rx.close()
    waiter.join(10)
    assert not waiter.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], DoorbellError)


def test_ringing_a_closed_receiver_fails() -> None:
    tx, rx = _connected()
    rx.close()
    with pytest.raises(DoorbellError, match="ringing"):
        for _ in range(1000):  # the first sends may still be buffered
            tx.ring(b"\0" * HEADER_BYTES, 5)
    tx.close()


def test_a_header_of_the_wrong_size_is_refused(pair: tuple[Doorbell, Doorbell]) -> None:
    tx, _rx = pair
    with pytest.raises(ValueError, match=f"a header is {HEADER_BYTES} bytes"):
        tx.ring(b"short", 5)


def test_a_stray_connection_is_turned_away() -> None:
    ns = dist.HashStore()
    got: list[Doorbell] = []
    listener = threading.Thread(target=lambda: got.append(Doorbell.listen(ns, HOST, "mine", 10,
                                                                          SECRET)))
    listener.start()
    ns.wait(["bell/addr"])
    host, port, nonce = json.loads(ns.get("bell/addr").decode())
    other = Secret(b"another-deployment-secret-bytes!")
    strays = [b"PDKV-BELL:mine",  # the name alone (no tag)
              b"PDKV-BELL:" + other.tag("kv-doorbell", "mine", bytes.fromhex(nonce)),
              b"PDKV-BELL:" + SECRET.tag("kv-doorbell", "mine", b"\0" * 16)]  # old nonce
    for hello in strays:
        with socket.create_connection((host, port), timeout=5) as stray:
            stray.sendall(hello)
            assert stray.recv(1) == b""  # turned away: closed unread
    with socket.create_connection((host, port), timeout=5):  # a silent connection
        tx = Doorbell.connect(ns, "mine", 10, SECRET)  # served after the silent one's wait
        listener.join(10)
    assert len(got) == 1
    tx.ring(b"\x01" * HEADER_BYTES, 5)
    assert got[0].wait(5) == b"\x01" * HEADER_BYTES
    tx.close()
    got[0].close()


def test_nobody_connecting_is_a_clear_error() -> None:
    with pytest.raises(DoorbellError, match="did not connect within"):
        Doorbell.listen(dist.HashStore(), HOST, "alone", 0.2, SECRET)


def test_check_peer_is_quiet_while_the_peer_is_there(pair: tuple[Doorbell, Doorbell]) -> None:
    tx, rx = pair
    tx.check_peer()
    rx.check_peer()
    tx.ring(b"\x09" * HEADER_BYTES, 5)
    for _ in range(200):  # until the header is in: checking buffers it, and keeps it
        rx.check_peer()
        if len(rx._buf) == HEADER_BYTES:
            break
        time.sleep(0.01)
    assert rx.wait(5) == b"\x09" * HEADER_BYTES


@pytest.mark.parametrize("goodbye", [False, True])
def test_check_peer_sees_the_receiver_go(pair: tuple[Doorbell, Doorbell],
                                         goodbye: bool) -> None:
    tx, rx = pair  # the prefill end learns, mid-transfer, that the decode end went away
    rx.close(goodbye=goodbye)
    expected = PeerLeft if goodbye else DoorbellError
    with pytest.raises(DoorbellError) as info:
        for _ in range(500):
            tx.check_peer()
            time.sleep(0.01)
    assert type(info.value) is expected
    with pytest.raises(expected):  # and keeps saying so
        tx.check_peer()


def test_check_peer_sees_a_goodbye_behind_a_header(pair: tuple[Doorbell, Doorbell]) -> None:
    tx, rx = pair
    tx.ring(b"\x03" * HEADER_BYTES, 5)
    tx.close(goodbye=True)
    with pytest.raises(PeerLeft):
        for _ in range(500):
            rx.check_peer()
            time.sleep(0.01)
    assert rx.wait(5) == b"\x03" * HEADER_BYTES  # the header rung before is not lost
    with pytest.raises(PeerLeft):
        rx.wait(5)


def test_check_peer_after_close_here(pair: tuple[Doorbell, Doorbell]) -> None:
    tx, _rx = pair
    tx.close()
    with pytest.raises(DoorbellError, match="closed"):
        tx.check_peer()
