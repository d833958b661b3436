"""KV transfers between a sender and a receiver on CPU (Gloo), the two ends on two threads of
one process: round trips, messages and pool transfers, pipelining, staying in sync after a
rejected, cancelled or corrupted transfer, and misuse."""

from __future__ import annotations

import dataclasses
import select
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from pdserve.engine.kv import (
    ChannelClosed,
    ChannelError,
    Departure,
    KVReceiver,
    TransferError,
    TransferHeader,
    TransferTimeout,
    match_header,
)
from pdserve.engine.kv.sender import TRAILER_RING
from pdserve_testing.kv import (
    SPEC,
    both,
    channel_name,
    make_header,
    make_layers,
    match,
    pair,
    pool_of,
    recv_blocks,
    recv_checked,
    recv_layer,
    send_blocks,
    send_layer,
    send_pool_blocks,
)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_back_to_back(decode_store: Any, dtype: str) -> None:
    spec = dataclasses.replace(SPEC, dtype=dtype)
    plan = [(101, 1), (102, 3), (103, 0), (104, 7), (105, 2)]  # (transfer_id, num_blocks)

    with pair(decode_store, spec) as (tx, rx):
        def send() -> None:
            for i, (tid, n) in enumerate(plan):
                layers = make_layers(spec, n, seed=tid)
                if i % 2:
                    send_blocks(tx, make_header(spec, tid, n), layers)
                else:  # streaming: header first, then the layers as they become ready
                    tx.send_header(make_header(spec, tid, n))
                    for t in layers:
                        send_layer(tx, t)
                    tx.finish()
                assert tx.stats.last_bytes == spec.num_layers * spec.layer_bytes(n)

        def recv() -> list[tuple[TransferHeader, list[torch.Tensor]]]:
            out = []
            for i, (tid, n) in enumerate(plan):
                if i % 2:
                    got: list[torch.Tensor] = []

                    def resolve(h: TransferHeader, tid: int = tid, n: int = n,
                                got: list[torch.Tensor] = got) -> Callable[
                                    [int, torch.Tensor], None]:
                        match_header(h, tid, 1, n)
                        return lambda layer, buf: got.append(buf.clone())

                    out.append((recv_blocks(rx, resolve), got))
                else:
                    out.append(recv_checked(rx, tid, 1, n))
                assert rx.stats.last_bytes == spec.num_layers * spec.layer_bytes(n)
                assert rx.stats.last_seconds > 0
            return out

        _, received = both(send, recv)
        assert tx.stats.transfers == rx.stats.transfers == len(plan)

    for (tid, n), (h, got) in zip(plan, received, strict=True):
        assert h == make_header(spec, tid, n)
        assert h.first_token == 1000 + tid
        assert len(got) == spec.num_layers
        for a, b in zip(got, make_layers(spec, n, seed=tid), strict=True):
            assert a.dtype == spec.torch_dtype and a.shape == spec.layer_shape(n)
            assert torch.equal(a, b)


def test_recv_into_caller_buffer(decode_store: Any) -> None:
    with pair(decode_store) as (tx, rx):
        layers = make_layers(SPEC, 2, seed=5)
        outs = [torch.empty(SPEC.layer_shape(2)) for _ in range(SPEC.num_layers)]

        def recv() -> None:
            h = rx.recv_header()
            match(rx, h, 7, 1, 2)
            for o in outs:
                assert recv_layer(rx, o) is o
            rx.verify()

        both(lambda: send_blocks(tx, make_header(SPEC, 7, 2), layers), recv)
        for a, b in zip(outs, layers, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(("per_message", "slots"), [(1, 2), (2, 2), (3, 2), (1, 3)])
def test_pool_round_trip_in_messages(decode_store: Any, per_message: int, slots: int) -> None:
    """send_from_pool / recv_into_pool: the blocks land in the receiver's own block ids, in
    messages of 1, 2 (3 layers: 2 + 1) and 3 layers, through 2 or 3 staging buffers; the
    checksum the receiver verified is kv_checksum of the whole packed payload; the next
    transfer (other k) lines up."""
    src = pool_of(SPEC, 9, seed=per_message)
    src_ids = torch.tensor([7, 0, 4, 8])
    dst = torch.zeros_like(src)
    dst_ids = torch.tensor([1, 5, 2, 6])
    with pair(decode_store) as (tx, rx):
        tx.set_staging_slots(slots)
        rx.set_staging_slots(slots)
        def send() -> None:
            for tid, k in ((40, per_message), (41, 1)):
                h = dataclasses.replace(make_header(SPEC, tid, 4), layers_per_message=k)
                send_pool_blocks(tx, h, src, src_ids, first_token=tid)

        def recv() -> list[int]:
            tokens = []
            for tid in (40, 41):
                h = rx.recv_header()
                match(rx, h, tid, 1, 4)
                dst.zero_()
                tokens.append(rx.recv_pool_blocks(h, dst, dst_ids).first_token)
                assert torch.equal(dst[:, :, dst_ids], src[:, :, src_ids])
                others = [i for i in range(9) if i not in dst_ids.tolist()]
                assert not dst[:, :, others].any()
            return tokens

        _, tokens = both(send, recv)
        assert tokens == [40, 41]
        assert tx.stats.last_bytes == rx.stats.last_bytes == 3 * SPEC.layer_bytes(4)


def test_messages_and_checksum_cover_the_whole_payload(decode_store: Any) -> None:
    """recv_message hands out [k_m, 2, n, ...] messages; a corrupted second message of a
    2-layer-message transfer is caught; caller-packed messages send_message and pool
    messages agree on the checksum (the same transfer either way)."""
    src = pool_of(SPEC, 5, seed=11)
    ids = torch.tensor([3, 1])
    packed = src[:, :, ids].contiguous()  # [L, 2, n, ...]
    with pair(decode_store) as (tx, rx):
        def send() -> None:
            h = dataclasses.replace(make_header(SPEC, 50, 2), layers_per_message=2)
            tx.send_header(h)
            tx.send_message(packed[0:2])
            tx.send_message(packed[2:3])
            tx.finish()
            tx._send_hook = lambda m, t: t.neg() if m == 1 else t
            send_pool_blocks(tx, dataclasses.replace(h, transfer_id=51), src, ids)
            tx._send_hook = None

        def recv() -> list[torch.Tensor]:
            h = rx.recv_header()
            got = [rx.recv_message().clone() for _ in range(h.num_messages)]
            rx.verify()
            h = rx.recv_header()
            rx.recv_message()
            with pytest.raises(ValueError, match="bad out tensor: shape"):
                rx.recv_message(torch.empty(2, *SPEC.layer_shape(2)))  # 1 layer left
            h = rx.recv_header()  # the bad out drained transfer 51; send it again below
            return got

        def send_again() -> None:
            send()
            h = dataclasses.replace(make_header(SPEC, 52, 2), layers_per_message=2)
            tx._send_hook = lambda m, t: t.neg() if m == 1 else t
            send_pool_blocks(tx, h, src, ids)
            tx._send_hook = None

        def recv_corrupt() -> list[torch.Tensor]:
            got = recv()
            dst = torch.zeros_like(src)
            with pytest.raises(TransferError, match="checksum mismatch for transfer 52"):
                rx.recv_pool_blocks(rx.current or rx.recv_header(), dst, ids)
            return got

        _, got = both(send_again, recv_corrupt)
        assert [tuple(g.shape) for g in got] == [(2, *SPEC.layer_shape(2)),
                                                 (1, *SPEC.layer_shape(2))]
        assert torch.equal(torch.cat(got), packed)


def test_transfers_pipelined_while_another_thread_waits(decode_store: Any) -> None:
    """finish(wait=False) posts the trailer and the transfer departs: the next header goes
    out at once and its sends queue behind, while another thread (the prefill worker's
    finisher) waits for each departure, as the send thread reuses staging buffers that the
    departing sends still read (on Gloo each send may be waited for once only), and the
    trailer buffers. Every transfer lands intact in order with its first token;
    wait_finished() before finish() and finish() twice are refused."""
    src = pool_of(SPEC, 4, seed=3)
    ids = torch.tensor([1, 3])
    n = TRAILER_RING + 2  # the trailer buffers are reused
    with pair(decode_store) as (tx, rx):
        def send() -> list[int]:
            with pytest.raises(ChannelError, match="before finish"):
                tx.wait_finished()
            left: list[int] = []

            def wait(d: Departure) -> None:
                tx.wait_finished(d)
                left.append(d.header.transfer_id)

            with ThreadPoolExecutor(1) as finisher:
                waits = []
                for i in range(n):
                    h = dataclasses.replace(make_header(SPEC, 70 + i, 2), layers_per_message=1)
                    tx.send_header(h)  # the previous transfers may still be leaving
                    for layer in range(SPEC.num_layers):
                        tx.send_from_pool(src[layer:layer + 1] * (i + 1), ids)
                    departure = tx.finish(7 + i, wait=False)
                    assert tx.busy
                    with pytest.raises(ChannelError, match="without a transfer being sent"):
                        tx.finish(7 + i, wait=False)
                    waits.append(finisher.submit(wait, departure))
                for w in waits:
                    w.result(10)
            tx.wait_finished(departure)  # left already: returns at once
            assert not tx.busy and tx.stats.transfers == n
            return left

        def recv() -> list[tuple[int, torch.Tensor]]:
            got = []
            for i in range(n):
                h = rx.recv_header()
                dst = torch.zeros_like(src)
                v = rx.recv_pool_blocks(h, dst, torch.tensor([0, 2]))
                assert v.transfer_id == 70 + i
                got.append((v.first_token, dst))
            return got

        left, got = both(send, recv)
        assert left == [70 + i for i in range(n)]
        for i, (first_token, dst) in enumerate(got):
            assert first_token == 7 + i
            assert torch.equal(dst[:, :, [0, 2]], src[:, :, [1, 3]] * (i + 1))


def test_pool_arguments_are_checked(decode_store: Any) -> None:
    src = pool_of(SPEC, 4, seed=2)
    with pair(decode_store) as (tx, rx):
        def send() -> None:
            h = make_header(SPEC, 60, 2)
            tx.send_header(h)
            with pytest.raises(ValueError, match="expected int64\\[2\\]"):
                tx.send_from_pool(src[0:1], torch.tensor([0, 1, 2]))  # cancels transfer 60
            tx.send_header(dataclasses.replace(h, transfer_id=61))
            with pytest.raises(ValueError, match="pool layers of shape"):
                tx.send_from_pool(src[0:2], torch.tensor([0, 1]))  # 2 layers, k = 1
            tx.send_header(dataclasses.replace(h, transfer_id=63))
            # right shape, but each block's [bs, Hk, D] is not one run
            scrambled = src.transpose(3, 4).contiguous().transpose(3, 4)
            with pytest.raises(ValueError, match="pool blocks are not contiguous"):
                tx.send_from_pool(scrambled[0:1], torch.tensor([0, 1]))
            send_pool_blocks(tx, dataclasses.replace(h, transfer_id=62), src,
                                torch.tensor([0, 1]))

        def recv() -> None:
            for tid in (60, 61, 63):
                h = rx.recv_header()
                assert h.transfer_id == tid
                with pytest.raises(TransferError, match=f"transfer {tid} was cancelled"):
                    rx.recv_pool_blocks(h, torch.zeros_like(src), torch.tensor([2, 3]))
            h = rx.recv_header()
            with pytest.raises(ValueError, match="pool dtype"):
                rx.recv_into_pool(src[0:1].double(), torch.tensor([2, 3]))
            assert not rx.busy  # drained

        both(send, recv)


def test_corrupted_payload_detected_then_next_transfer_ok(decode_store: Any) -> None:
    with pair(decode_store) as (tx, rx):
        def corrupt(message: int, t: torch.Tensor) -> torch.Tensor:
            if message != 1:
                return t
            bad = t.clone()  # [1, 2, n, bs, Hk, D]: one layer per message
            bad[0, 1, 0, 2, 1, 3] += 1.0
            return bad

        def send() -> None:
            tx._send_hook = corrupt
            send_blocks(tx, make_header(SPEC, 17, 3), make_layers(SPEC, 3, seed=17))
            tx._send_hook = None
            send_blocks(tx, make_header(SPEC, 18, 2), make_layers(SPEC, 2, seed=18))

        def recv() -> list[torch.Tensor]:
            with pytest.raises(TransferError, match="checksum mismatch for transfer 17"):
                recv_checked(rx, 17, 1, 3)
            assert not rx.closed and not rx.busy
            return recv_checked(rx, 18, 1, 2)[1]

        _, got = both(send, recv)
        assert all(torch.equal(a, b) for a, b in zip(got, make_layers(SPEC, 2, 18), strict=True))
        assert not tx.closed and not rx.closed


@pytest.mark.parametrize(
    ("expect", "message"),
    [
        ((99, 1, 3), "transfer_id: got 17, expected 99"),
        ((17, 2, 3), "epoch: got 1, expected 2"),
        ((17, 1, 4), "num_blocks: got 3, expected 4"),
    ],
)
def test_header_mismatch_rejected_and_drained(
    decode_store: Any, expect: tuple[int, int, int], message: str
) -> None:
    with pair(decode_store) as (tx, rx):
        def send() -> None:
            send_blocks(tx, make_header(SPEC, 17, 3), make_layers(SPEC, 3, seed=1))
            send_blocks(tx, make_header(SPEC, 18, 3), make_layers(SPEC, 3, seed=2))

        def recv() -> list[torch.Tensor]:
            h = rx.recv_header()
            with pytest.raises(TransferError, match=message):
                match(rx, h, *expect)
            assert not rx.busy and not rx.closed  # the rejected payload was drained
            return recv_checked(rx, 18, 1, 3)[1]

        _, got = both(send, recv)
        assert all(torch.equal(a, b) for a, b in zip(got, make_layers(SPEC, 3, 2), strict=True))


def test_cancel_and_receiver_aborts_keep_channel_in_sync(decode_store: Any) -> None:
    with pair(decode_store) as (tx, rx):
        def failing_layers() -> Iterator[torch.Tensor]:
            yield make_layers(SPEC, 2, seed=3)[0]
            raise RuntimeError("pack kernel failed")

        def send() -> None:
            # 1: a layer of the wrong shape cancels the transfer
            tx.send_header(make_header(SPEC, 1, 2))
            with pytest.raises(ValueError, match="shape"):
                send_layer(tx, torch.zeros(SPEC.layer_shape(3)))
            assert not tx.busy
            # 2: the layer source fails mid-way
            with pytest.raises(RuntimeError, match="pack kernel failed"):
                send_blocks(tx, make_header(SPEC, 2, 2), failing_layers())
            # 3: the receiver's sink fails; 4: the receiver verifies too early; 5: good
            for tid in (3, 4, 5):
                send_blocks(tx, make_header(SPEC, tid, 2), make_layers(SPEC, 2, seed=tid))

        def recv() -> list[torch.Tensor]:
            for tid in (1, 2):
                with pytest.raises(TransferError, match=f"transfer {tid} was cancelled"):
                    recv_checked(rx, tid, 1, 2)

            def bad_sink(h: TransferHeader) -> Callable[[int, torch.Tensor], None]:
                def sink(layer: int, buf: torch.Tensor) -> None:
                    raise KeyError("reservation vanished")
                return sink

            with pytest.raises(KeyError):
                recv_blocks(rx, bad_sink)
            h = rx.recv_header()
            recv_layer(rx)
            with pytest.raises(TransferError, match="verify\\(\\) after 1 of 3 layers"):
                rx.verify()
            assert h.transfer_id == 4 and not rx.busy
            return recv_checked(rx, 5, 1, 2)[1]

        _, got = both(send, recv)
        assert all(torch.equal(a, b) for a, b in zip(got, make_layers(SPEC, 2, 5), strict=True))
        assert not tx.closed and not rx.closed


def _await_header(ch: KVReceiver, timeout_s: float = 10.0) -> None:
    """Block until the next transfer's header is on ``ch``'s doorbell, unread (white box: a
    select on the doorbell's socket)."""
    ready, _, _ = select.select([ch._end.bell._sock], [], [], timeout_s)
    assert ready, "the next header never came"


def test_next_transfer_starts_during_verify(decode_store: Any) -> None:
    """A header that is in while the current transfer is verified has its transfer started
    (first receive posted) by verify(); recv_header() returns it without waiting. It is
    checked, matched (a rejected one drained) and verified like any other. A one-message
    transfer started that way must not post its trailer's receive before the current
    transfer's trailer was read (both land in the same buffer)."""
    whole = 22  # sent as one message of every layer
    plan = ((21, 2, 21), (whole, 3, whole), (23, 2, 99), (24, 1, 24))

    def header(tid: int, blocks: int) -> TransferHeader:
        h = make_header(SPEC, tid, blocks)
        return dataclasses.replace(h, layers_per_message=SPEC.num_layers) if tid == whole else h

    with pair(decode_store) as (tx, rx):
        start_rx = rx._start_rx

        def start_slowly(raw: bytes) -> Any:
            """Give the sender time to deliver all it can of a transfer started early."""
            started = start_rx(raw)
            time.sleep(0.2)
            return started

        rx._start_rx = start_slowly  # type: ignore[method-assign]

        def send() -> None:
            for tid, blocks, _ in plan:
                layers = make_layers(SPEC, blocks, seed=tid)
                send_blocks(tx, header(tid, blocks),
                               [torch.stack(layers)] if tid == whole else layers)

        def recv() -> list[list[torch.Tensor]]:
            got = []
            verified = 0.0  # when the previous verify() returned
            for tid, blocks, expect in plan:
                h = rx.recv_header()
                # The first header came off the doorbell here; the next two during the
                # previous verify() (each was in before it, see below). The last one may
                # come either way (the drain of the rejected one looks for it too).
                if tid < 24:
                    assert (rx.last_header_at < verified) == (tid > 21)
                if expect != tid:
                    with pytest.raises(TransferError, match="transfer_id: got 23"):
                        match(rx, h, expect, 1, blocks)
                    continue
                match(rx, h, expect, 1, blocks)
                if tid == whole:
                    got.append(list(rx.recv_message().clone()))
                else:
                    got.append([recv_layer(rx).clone() for _ in range(h.num_layers)])
                if tid < 24:
                    _await_header(rx)
                assert rx.verify().first_token == 1000 + tid
                verified = time.perf_counter()
                assert not rx.busy
            return got

        _, got = both(send, recv)
        for layers, (tid, blocks, _) in zip(got, (plan[0], plan[1], plan[3]), strict=True):
            assert all(torch.equal(a, b)
                       for a, b in zip(layers, make_layers(SPEC, blocks, tid), strict=True))
        assert not tx.closed and not rx.closed


def test_idle_receiver_times_out_without_breaking_the_channel(decode_store: Any) -> None:
    with pair(decode_store) as (tx, rx):
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout, match="no transfer started"):
            rx.recv_header(timeout_s=0.5)
        assert time.monotonic() - t0 < 3
        assert not rx.closed
        _, (_, got) = both(
            lambda: send_blocks(tx, make_header(SPEC, 1, 1), make_layers(SPEC, 1, seed=1)),
            lambda: recv_checked(rx, 1, 1, 1),
        )
        assert torch.equal(got[2], make_layers(SPEC, 1, seed=1)[2])


def test_garbled_doorbell_closes_the_channel(decode_store: Any) -> None:
    """The doorbell carries the header: garbage there is a protocol failure (the receiver
    cannot know what follows), so the channel is closed, not left out of step."""
    with pair(decode_store) as (tx, rx):
        raw = bytearray(make_header(SPEC, 1, 1).to_bytes())
        raw[0] ^= 0xFF  # magic
        tx._end.bell.ring(bytes(raw), 5.0)
        with pytest.raises(ChannelClosed, match="garbled header: bad header magic"):
            rx.recv_header(timeout_s=5)
        assert rx.closed


def test_stalled_sender_closes_the_channel(decode_store: Any) -> None:
    with pair(decode_store, timeout_s=1.0) as (tx, rx):
        tx.send_header(make_header(SPEC, 1, 2))
        send_layer(tx, make_layers(SPEC, 2, seed=1)[0])  # ... and then the sender stalls
        rx.recv_header()
        recv_layer(rx)
        t0 = time.monotonic()
        with pytest.raises(ChannelClosed, match="receiving layer 1"):
            recv_layer(rx)
        assert 0.5 < time.monotonic() - t0 < 4
        assert rx.closed
        with pytest.raises(ChannelClosed, match="is closed"):
            rx.recv_header()


def test_sender_does_not_block_forever_on_a_dead_receiver(decode_store: Any) -> None:
    with pair(decode_store, timeout_s=1.0) as (tx, _rx):
        t0 = time.monotonic()
        with pytest.raises(ChannelClosed):
            # nobody receives
            send_blocks(tx, make_header(SPEC, 1, 2), make_layers(SPEC, 2, seed=1))
        assert time.monotonic() - t0 < 4
        assert tx.closed and not tx.busy
        with pytest.raises(ChannelClosed):
            tx.send_header(make_header(SPEC, 2, 2))


def test_misuse_is_rejected(decode_store: Any) -> None:
    name = channel_name("reuse")
    with pair(decode_store, name=name) as (tx, rx):
        # each end has only its own role's operations
        assert not hasattr(tx, "recv_header") and not hasattr(rx, "send_header")
        with pytest.raises(ChannelError, match="num_layers"):
            tx.send_header(dataclasses.replace(make_header(SPEC, 1, 1), num_layers=2))
        with pytest.raises(ChannelError, match="send_header\\(\\) first"):
            send_layer(tx, torch.zeros(SPEC.layer_shape(1)))
        with pytest.raises(ValueError, match="at least 2"):
            rx.set_staging_slots(1)
        tx.send_header(make_header(SPEC, 1, 1))
        with pytest.raises(ChannelError, match="during a transfer"):
            tx.set_staging_slots(3)
    # names are never reused
    with pytest.raises(ChannelError, match="already used"), pair(decode_store, name=name):
        pass
