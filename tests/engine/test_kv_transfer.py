"""KV channel tests on CPU (Gloo): two ends on two threads of one process, and one test with
two real processes (spawn)."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import select
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest
import torch

from pdserve.engine.kv_protocol import layers_per_message
from pdserve.engine.kv_transfer import (
    _TRAILER_RING,
    HEADER_SLOTS,
    ChannelClosed,
    ChannelError,
    ChannelSpec,
    Departure,
    HandshakeError,
    KVChannel,
    TransferError,
    TransferHeader,
    TransferTimeout,
    kv_checksum,
    match_header,
)
from pdserve_testing.kv import HOST, SPEC, channel_name, make_header, make_layers, prefill_process

T = TypeVar("T")
U = TypeVar("U")

KV_LOGGER = "pdserve.engine.kv_transfer"


def _both(send: Callable[[], T], recv: Callable[[], U], timeout: float = 30) -> tuple[T, U]:
    """Run the two ends concurrently; re-raise the first error."""
    with ThreadPoolExecutor(2) as pool:
        fs, fr = pool.submit(send), pool.submit(recv)
        return fs.result(timeout), fr.result(timeout)


def _catch(fn: Callable[[], Any]) -> Callable[[], BaseException | None]:
    def run() -> BaseException | None:
        try:
            fn()
        except BaseException as e:
            return e
        return None

    return run


# Opening waits generously: in some sandboxes an occasional TCP connect to the store stalls
# for seconds. Per-operation timeouts stay short.
OPEN_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def decode_store() -> Iterator[tuple[torch.distributed.TCPStore, int]]:
    store, port = KVChannel.host_store(HOST, 0, timeout_s=OPEN_TIMEOUT_S)
    yield store, port


_clients: dict[int, torch.distributed.TCPStore] = {}


def _client(port: int) -> torch.distributed.TCPStore:
    """The prefill process's connection to a decode store (one per store, like a worker)."""
    if port not in _clients:
        _clients[port] = KVChannel.connect_store(HOST, port, timeout_s=OPEN_TIMEOUT_S)
    return _clients[port]


@contextmanager
def _pair(
    decode_store: tuple[torch.distributed.TCPStore, int],
    spec: ChannelSpec = SPEC,
    decode_spec: ChannelSpec | None = None,
    timeout_s: float = 5.0,
    name: str | None = None,
) -> Iterator[tuple[KVChannel, KVChannel]]:
    store, port = decode_store
    name = name or channel_name("pair")

    def open_end(rank: int) -> KVChannel:
        return KVChannel.open(
            store=_client(port) if rank == 0 else store, name=name, rank=rank,
            spec=spec if rank == 0 else (decode_spec or spec), device="cpu",
            timeout_s=timeout_s, open_timeout_s=OPEN_TIMEOUT_S, gloo_host=HOST,
        )

    tx, rx = _both(lambda: open_end(0), lambda: open_end(1))
    try:
        yield tx, rx
    finally:
        tx.close()
        rx.close()


def _recv_checked(rx: KVChannel, tid: int, epoch: int, num_blocks: int) -> tuple[
        TransferHeader, list[torch.Tensor]]:
    h = rx.recv_header()
    rx.match(h, tid, epoch, num_blocks)
    got = [rx.recv_layer().clone() for _ in range(h.num_layers)]
    rx.verify()
    return h, got


# ---- checksum, header, matching ------------------------------------------------------


def test_kv_checksum_position_sensitive() -> None:
    x = torch.randn(SPEC.layer_shape(5), generator=torch.Generator().manual_seed(0))
    base = kv_checksum(x)
    assert isinstance(base, int) and base != 0
    assert kv_checksum(x.clone()) == base

    swapped = x.clone()  # swap blocks 1 and 3 of the K half
    swapped[0, 1], swapped[0, 3] = x[0, 3].clone(), x[0, 1].clone()
    assert kv_checksum(swapped) != base

    kv_swapped = torch.stack([x[1], x[0]])  # K and V exchanged
    assert kv_checksum(kv_swapped) != base

    flat = x.clone().view(-1)  # two neighbouring words exchanged
    flat[10], flat[11] = x.view(-1)[11].item(), x.view(-1)[10].item()
    assert kv_checksum(flat) != base

    bit = x.clone()  # one bit flipped
    bit.view(torch.int32).view(-1)[7] ^= 1
    assert kv_checksum(bit) != base

    # bf16, odd byte counts and empty tensors all work.
    xb = x.to(torch.bfloat16)
    sb = xb.clone()
    sb[1, 0], sb[1, 2] = xb[1, 2].clone(), xb[1, 0].clone()
    assert kv_checksum(xb) != kv_checksum(sb)
    odd = torch.arange(7, dtype=torch.uint8)
    assert kv_checksum(odd) != kv_checksum(odd.flip(0))
    assert kv_checksum(torch.empty(0)) == 0
    with pytest.raises(ValueError, match="contiguous"):
        kv_checksum(x.transpose(1, 2))


def test_spec_from_configs() -> None:
    from pdserve.engine.config import PRESETS, CacheConfig

    model = PRESETS["tiny"]
    spec = ChannelSpec.from_configs(model, CacheConfig(block_size=16, dtype=torch.bfloat16))
    assert spec == ChannelSpec(
        fingerprint=model.fingerprint(), dtype="bfloat16", block_size=16,
        num_layers=model.num_layers, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
    )
    assert spec.layer_bytes(3) == 2 * 3 * 16 * model.num_kv_heads * model.head_dim * 2
    with pytest.raises(ValueError, match="dtype"):
        dataclasses.replace(spec, dtype="float128")


def test_header_round_trip_and_garbage() -> None:
    h = make_header(SPEC, tid=17, num_blocks=5, epoch=3)
    raw = h.to_bytes()
    assert len(raw) == HEADER_SLOTS * 8
    assert TransferHeader.from_bytes(raw) == h
    assert h.bytes_per_layer == SPEC.layer_bytes(5) == 2 * 5 * 4 * 2 * 8 * 4

    for slot, value, msg in [
        (0, 12345, "magic"),
        (1, 99, "version"),
        (4, 6, "self-check"),  # num_blocks changed in flight
        (12, 1, "self-check"),
    ]:
        bad = bytearray(raw)
        bad[slot * 8:slot * 8 + 8] = value.to_bytes(8, "little", signed=True)
        with pytest.raises(TransferError, match=msg):
            TransferHeader.from_bytes(bytes(bad))
    with pytest.raises(TransferError, match="int64"):
        TransferHeader.from_bytes(raw[:-8])
    with pytest.raises(TransferError, match="int64"):
        TransferHeader.from_bytes(bytes(24))
    with pytest.raises(ValueError, match="epoch"):
        dataclasses.replace(h, epoch=-1)


def test_header_messages() -> None:
    h = dataclasses.replace(make_header(SPEC, tid=3, num_blocks=2), layers_per_message=2)
    assert TransferHeader.from_bytes(h.to_bytes()) == h
    assert h.num_messages == 2  # 3 layers: [0, 1], [2]
    assert [list(h.message_layers(m)) for m in range(h.num_messages)] == [[0, 1], [2]]
    with pytest.raises(ValueError, match="layers_per_message=4 exceeds num_layers=3"):
        dataclasses.replace(h, layers_per_message=4)
    with pytest.raises(ValueError, match="layers_per_message"):
        dataclasses.replace(h, layers_per_message=0)
    assert layers_per_message(16 << 20, 32, target=64 << 20) == 4
    assert layers_per_message(200 << 20, 32) == 1
    assert layers_per_message(1, 32) == 32
    assert TransferHeader.from_bytes(h.to_bytes()) == h  # the doorbell's form
    with pytest.raises(TransferError, match="must be 128 bytes"):
        TransferHeader.from_bytes(h.to_bytes()[:-1])
    raw = bytearray(h.to_bytes())
    raw[16] ^= 1  # transfer id
    with pytest.raises(TransferError, match="self-check"):
        TransferHeader.from_bytes(bytes(raw))


def test_match_header_fails_closed() -> None:
    h = make_header(SPEC, tid=17, num_blocks=5, epoch=3)
    match_header(h, 17, 3, 5)
    with pytest.raises(TransferError, match="transfer_id: got 17, expected 18"):
        match_header(h, 18, 3, 5)
    with pytest.raises(TransferError, match="epoch: got 3, expected 4"):
        match_header(h, 17, 4, 5)
    with pytest.raises(TransferError, match="num_blocks: got 5, expected 6"):
        match_header(h, 17, 3, 6)
    with pytest.raises(TransferError, match="epoch: got 3, expected 2; num_blocks: got 5"):
        match_header(h, 17, 2, 4)


# ---- channel over threads --------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_back_to_back(decode_store: Any, dtype: str) -> None:
    spec = dataclasses.replace(SPEC, dtype=dtype)
    plan = [(101, 1), (102, 3), (103, 0), (104, 7), (105, 2)]  # (transfer_id, num_blocks)

    with _pair(decode_store, spec) as (tx, rx):
        def send() -> None:
            for i, (tid, n) in enumerate(plan):
                layers = make_layers(spec, n, seed=tid)
                if i % 2:
                    tx.send_blocks(make_header(spec, tid, n), layers)
                else:  # streaming: header first, then the layers as they become ready
                    tx.send_header(make_header(spec, tid, n))
                    for t in layers:
                        tx.send_layer(t)
                    tx.finish()
                assert tx.last_transfer_bytes == spec.num_layers * spec.layer_bytes(n)

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

                    out.append((rx.recv_blocks(resolve), got))
                else:
                    out.append(_recv_checked(rx, tid, 1, n))
                assert rx.last_transfer_bytes == spec.num_layers * spec.layer_bytes(n)
                assert rx.last_transfer_seconds > 0
            return out

        _, received = _both(send, recv)
        assert tx.total_transfers == rx.total_transfers == len(plan)

    for (tid, n), (h, got) in zip(plan, received, strict=True):
        assert h == make_header(spec, tid, n)
        assert h.first_token == 1000 + tid
        assert len(got) == spec.num_layers
        for a, b in zip(got, make_layers(spec, n, seed=tid), strict=True):
            assert a.dtype == spec.torch_dtype and a.shape == spec.layer_shape(n)
            assert torch.equal(a, b)


def test_recv_into_caller_buffer(decode_store: Any) -> None:
    with _pair(decode_store) as (tx, rx):
        layers = make_layers(SPEC, 2, seed=5)
        outs = [torch.empty(SPEC.layer_shape(2)) for _ in range(SPEC.num_layers)]

        def recv() -> None:
            h = rx.recv_header()
            rx.match(h, 7, 1, 2)
            for o in outs:
                assert rx.recv_layer(o) is o
            rx.verify()

        _both(lambda: tx.send_blocks(make_header(SPEC, 7, 2), layers), recv)
        for a, b in zip(outs, layers, strict=True):
            assert torch.equal(a, b)


def _pool(spec: ChannelSpec, num_blocks: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads,
             spec.head_dim)
    return torch.randn(shape, generator=g).to(spec.torch_dtype)


@pytest.mark.parametrize(("per_message", "slots"), [(1, 2), (2, 2), (3, 2), (1, 3)])
def test_pool_round_trip_in_messages(decode_store: Any, per_message: int, slots: int) -> None:
    """send_from_pool / recv_into_pool: the blocks land in the receiver's own block ids, in
    messages of 1, 2 (3 layers: 2 + 1) and 3 layers, through 2 or 3 staging buffers; the
    checksum the receiver verified is kv_checksum of the whole packed payload; the next
    transfer (other k) lines up."""
    src = _pool(SPEC, 9, seed=per_message)
    src_ids = torch.tensor([7, 0, 4, 8])
    dst = torch.zeros_like(src)
    dst_ids = torch.tensor([1, 5, 2, 6])
    with _pair(decode_store) as (tx, rx):
        tx.set_staging_slots(slots)
        rx.set_staging_slots(slots)
        def send() -> None:
            for tid, k in ((40, per_message), (41, 1)):
                h = dataclasses.replace(make_header(SPEC, tid, 4), layers_per_message=k)
                tx.send_pool_blocks(h, src, src_ids, first_token=tid)

        def recv() -> list[int]:
            tokens = []
            for tid in (40, 41):
                h = rx.recv_header()
                rx.match(h, tid, 1, 4)
                dst.zero_()
                tokens.append(rx.recv_pool_blocks(h, dst, dst_ids).first_token)
                assert torch.equal(dst[:, :, dst_ids], src[:, :, src_ids])
                others = [i for i in range(9) if i not in dst_ids.tolist()]
                assert not dst[:, :, others].any()
            return tokens

        _, tokens = _both(send, recv)
        assert tokens == [40, 41]
        assert tx.last_transfer_bytes == rx.last_transfer_bytes == 3 * SPEC.layer_bytes(4)


def test_messages_and_checksum_cover_the_whole_payload(decode_store: Any) -> None:
    """recv_message hands out [k_m, 2, n, ...] messages; a corrupted second message of a
    2-layer-message transfer is caught; caller-packed messages send_message and pool
    messages agree on the checksum (the same transfer either way)."""
    src = _pool(SPEC, 5, seed=11)
    ids = torch.tensor([3, 1])
    packed = src[:, :, ids].contiguous()  # [L, 2, n, ...]
    with _pair(decode_store) as (tx, rx):
        def send() -> None:
            h = dataclasses.replace(make_header(SPEC, 50, 2), layers_per_message=2)
            tx.send_header(h)
            tx.send_message(packed[0:2])
            tx.send_message(packed[2:3])
            tx.finish()
            tx._send_hook = lambda m, t: t.neg() if m == 1 else t
            tx.send_pool_blocks(dataclasses.replace(h, transfer_id=51), src, ids)
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
            tx.send_pool_blocks(h, src, ids)
            tx._send_hook = None

        def recv_corrupt() -> list[torch.Tensor]:
            got = recv()
            dst = torch.zeros_like(src)
            with pytest.raises(TransferError, match="checksum mismatch for transfer 52"):
                rx.recv_pool_blocks(rx._rx.header if rx._rx else rx.recv_header(), dst, ids)
            return got

        _, got = _both(send_again, recv_corrupt)
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
    src = _pool(SPEC, 4, seed=3)
    ids = torch.tensor([1, 3])
    n = _TRAILER_RING + 2  # the trailer buffers are reused
    with _pair(decode_store) as (tx, rx):
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
            assert not tx.busy and tx.total_transfers == n
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

        left, got = _both(send, recv)
        assert left == [70 + i for i in range(n)]
        for i, (first_token, dst) in enumerate(got):
            assert first_token == 7 + i
            assert torch.equal(dst[:, :, [0, 2]], src[:, :, [1, 3]] * (i + 1))


def test_pool_arguments_are_checked(decode_store: Any) -> None:
    src = _pool(SPEC, 4, seed=2)
    with _pair(decode_store) as (tx, rx):
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
            tx.send_pool_blocks(dataclasses.replace(h, transfer_id=62), src,
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

        _both(send, recv)


@pytest.mark.parametrize(
    ("field", "prefill_value", "decode_value"),
    [
        ("block_size", 16, 32),
        ("fingerprint", "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"),
        ("dtype", "bfloat16", "float16"),
    ],
)
def test_handshake_mismatch_raises_on_both_sides(
    decode_store: Any, field: str, prefill_value: Any, decode_value: Any
) -> None:
    store, port = decode_store
    name = channel_name("hs")
    specs = [dataclasses.replace(SPEC, **{field: v}) for v in (prefill_value, decode_value)]
    def open_end(rank: int) -> None:
        KVChannel.open(store=_client(port) if rank == 0 else store, name=name, rank=rank,
                       spec=specs[rank], device="cpu", timeout_s=5,
                       open_timeout_s=OPEN_TIMEOUT_S)

    errs = _both(_catch(lambda: open_end(0)), _catch(lambda: open_end(1)))
    want = f"{field}: prefill={prefill_value} decode={decode_value}"
    for err in errs:
        assert isinstance(err, HandshakeError), err
        assert want in str(err)


def test_handshake_lists_every_difference(decode_store: Any) -> None:
    store, port = decode_store
    name = channel_name("hs")
    specs = [SPEC, dataclasses.replace(SPEC, num_layers=4, head_dim=16, kv_layout="L,N,2")]
    def open_end(rank: int) -> None:
        KVChannel.open(store=_client(port) if rank == 0 else store, name=name, rank=rank,
                       spec=specs[rank], device="cpu", timeout_s=5,
                       open_timeout_s=OPEN_TIMEOUT_S)

    for err in _both(_catch(lambda: open_end(0)), _catch(lambda: open_end(1))):
        assert isinstance(err, HandshakeError)
        msg = str(err)
        for part in ("num_layers: prefill=3 decode=4", "head_dim: prefill=8 decode=16",
                     "kv_layout: prefill=L,2,N,bs,Hk,D decode=L,N,2"):
            assert part in msg
        assert "block_size" not in msg


def test_corrupted_payload_detected_then_next_transfer_ok(decode_store: Any) -> None:
    with _pair(decode_store) as (tx, rx):
        def corrupt(message: int, t: torch.Tensor) -> torch.Tensor:
            if message != 1:
                return t
            bad = t.clone()  # [1, 2, n, bs, Hk, D]: one layer per message
            bad[0, 1, 0, 2, 1, 3] += 1.0
            return bad

        def send() -> None:
            tx._send_hook = corrupt
            tx.send_blocks(make_header(SPEC, 17, 3), make_layers(SPEC, 3, seed=17))
            tx._send_hook = None
            tx.send_blocks(make_header(SPEC, 18, 2), make_layers(SPEC, 2, seed=18))

        def recv() -> list[torch.Tensor]:
            with pytest.raises(TransferError, match="checksum mismatch for transfer 17"):
                _recv_checked(rx, 17, 1, 3)
            assert not rx.closed and not rx.busy
            return _recv_checked(rx, 18, 1, 2)[1]

        _, got = _both(send, recv)
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
    with _pair(decode_store) as (tx, rx):
        def send() -> None:
            tx.send_blocks(make_header(SPEC, 17, 3), make_layers(SPEC, 3, seed=1))
            tx.send_blocks(make_header(SPEC, 18, 3), make_layers(SPEC, 3, seed=2))

        def recv() -> list[torch.Tensor]:
            h = rx.recv_header()
            with pytest.raises(TransferError, match=message):
                rx.match(h, *expect)
            assert not rx.busy and not rx.closed  # the rejected payload was drained
            return _recv_checked(rx, 18, 1, 3)[1]

        _, got = _both(send, recv)
        assert all(torch.equal(a, b) for a, b in zip(got, make_layers(SPEC, 3, 2), strict=True))


def test_cancel_and_receiver_aborts_keep_channel_in_sync(decode_store: Any) -> None:
    with _pair(decode_store) as (tx, rx):
        def failing_layers() -> Iterator[torch.Tensor]:
            yield make_layers(SPEC, 2, seed=3)[0]
            raise RuntimeError("pack kernel failed")

        def send() -> None:
            # 1: a layer of the wrong shape cancels the transfer
            tx.send_header(make_header(SPEC, 1, 2))
            with pytest.raises(ValueError, match="shape"):
                tx.send_layer(torch.zeros(SPEC.layer_shape(3)))
            assert not tx.busy
            # 2: the layer source fails mid-way
            with pytest.raises(RuntimeError, match="pack kernel failed"):
                tx.send_blocks(make_header(SPEC, 2, 2), failing_layers())
            # 3: the receiver's sink fails; 4: the receiver verifies too early; 5: good
            for tid in (3, 4, 5):
                tx.send_blocks(make_header(SPEC, tid, 2), make_layers(SPEC, 2, seed=tid))

        def recv() -> list[torch.Tensor]:
            for tid in (1, 2):
                with pytest.raises(TransferError, match=f"transfer {tid} was cancelled"):
                    _recv_checked(rx, tid, 1, 2)

            def bad_sink(h: TransferHeader) -> Callable[[int, torch.Tensor], None]:
                def sink(layer: int, buf: torch.Tensor) -> None:
                    raise KeyError("reservation vanished")
                return sink

            with pytest.raises(KeyError):
                rx.recv_blocks(bad_sink)
            h = rx.recv_header()
            rx.recv_layer()
            with pytest.raises(TransferError, match="verify\\(\\) after 1 of 3 layers"):
                rx.verify()
            assert h.transfer_id == 4 and not rx.busy
            return _recv_checked(rx, 5, 1, 2)[1]

        _, got = _both(send, recv)
        assert all(torch.equal(a, b) for a, b in zip(got, make_layers(SPEC, 2, 5), strict=True))
        assert not tx.closed and not rx.closed


def _await_header(ch: KVChannel, timeout_s: float = 10.0) -> None:
    """Block until the next transfer's header is on ``ch``'s doorbell, unread (white box: a
    select on the doorbell's socket)."""
    ready, _, _ = select.select([ch._bell._sock], [], [], timeout_s)
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

    with _pair(decode_store) as (tx, rx):
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
                tx.send_blocks(header(tid, blocks),
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
                        rx.match(h, expect, 1, blocks)
                    continue
                rx.match(h, expect, 1, blocks)
                if tid == whole:
                    got.append(list(rx.recv_message().clone()))
                else:
                    got.append([rx.recv_layer().clone() for _ in range(h.num_layers)])
                if tid < 24:
                    _await_header(rx)
                assert rx.verify().first_token == 1000 + tid
                verified = time.perf_counter()
                assert not rx.busy
            return got

        _, got = _both(send, recv)
        for layers, (tid, blocks, _) in zip(got, (plan[0], plan[1], plan[3]), strict=True):
            assert all(torch.equal(a, b)
                       for a, b in zip(layers, make_layers(SPEC, blocks, tid), strict=True))
        assert not tx.closed and not rx.closed

def test_one_prefill_two_decoders(decode_store: Any) -> None:
    other = KVChannel.host_store(HOST, 0, timeout_s=OPEN_TIMEOUT_S)
    with _pair(decode_store, name="p0-to-d") as (tx_a, rx_a), \
            _pair(other, name="p0-to-d") as (tx_b, rx_b):  # same name, other decoder's store
        def send() -> None:
            for i in range(3):  # interleaved transfers on the two channels
                tx_a.send_blocks(make_header(SPEC, 10 + i, 2), make_layers(SPEC, 2, seed=10 + i))
                tx_b.send_blocks(make_header(SPEC, 20 + i, 1), make_layers(SPEC, 1, seed=20 + i))

        def recv(rx: KVChannel, base: int, n: int) -> Callable[[], list[list[torch.Tensor]]]:
            return lambda: [_recv_checked(rx, base + i, 1, n)[1] for i in range(3)]

        with ThreadPoolExecutor(3) as pool:
            fs = pool.submit(send)
            fa, fb = pool.submit(recv(rx_a, 10, 2)), pool.submit(recv(rx_b, 20, 1))
            fs.result(30)
            got_a, got_b = fa.result(30), fb.result(30)
    for i in range(3):
        want_a, want_b = make_layers(SPEC, 2, 10 + i), make_layers(SPEC, 1, 20 + i)
        assert all(torch.equal(a, b) for a, b in zip(got_a[i], want_a, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(got_b[i], want_b, strict=True))


def test_idle_receiver_times_out_without_breaking_the_channel(decode_store: Any) -> None:
    with _pair(decode_store) as (tx, rx):
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout, match="no transfer started"):
            rx.recv_header(timeout_s=0.5)
        assert time.monotonic() - t0 < 3
        assert not rx.closed
        _, (_, got) = _both(
            lambda: tx.send_blocks(make_header(SPEC, 1, 1), make_layers(SPEC, 1, seed=1)),
            lambda: _recv_checked(rx, 1, 1, 1),
        )
        assert torch.equal(got[2], make_layers(SPEC, 1, seed=1)[2])


def _peer_news(caplog: pytest.LogCaptureFixture) -> list[int]:
    """Levels of the records about the prefill end going away (whatever else is logged)."""
    return [r.levelno for r in caplog.records if "the prefill end" in r.getMessage()]


def test_idle_receiver_sees_a_closed_sender(decode_store: Any,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """The doorbell is a connection: when the prefill end goes away, an idle receiver learns
    it at once (ChannelClosed), instead of waiting out its timeout (TransferTimeout). A
    sender closed on purpose (shutdown) says goodbye: no warning on the decode side."""
    with _pair(decode_store) as (tx, rx), caplog.at_level(logging.INFO, KV_LOGGER):
        tx.close(abort=True)
        with pytest.raises(ChannelClosed, match="the prefill end closed the channel"):
            rx.recv_header(timeout_s=60)
        assert rx.closed
    assert _peer_news(caplog) == [logging.INFO]


def test_idle_receiver_sees_a_dead_sender(decode_store: Any,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """A sender whose process died only leaves a closed connection: a warning."""
    with _pair(decode_store) as (tx, rx), caplog.at_level(logging.INFO, KV_LOGGER):
        tx._bell.close()  # what the kernel does for a process that is gone
        with pytest.raises(ChannelClosed, match="the prefill end is gone"):
            rx.recv_header(timeout_s=60)
        assert rx.closed
    assert _peer_news(caplog) == [logging.WARNING]


class _GpuWork:
    """Stands in for an NCCL work in the CUDA wait loop of ``KVChannel._wait`` (whose
    polling, deadline and peer checks are what these tests cover): it completes
    ``done_after_s`` after it is made, or never (on NCCL, a send or receive whose peer
    aborted its communicator never does)."""

    def __init__(self, done_after_s: float | None = None) -> None:
        self._at = None if done_after_s is None else time.monotonic() + done_after_s

    def is_completed(self) -> bool:
        return self._at is not None and time.monotonic() >= self._at

    def wait(self) -> None:
        assert self.is_completed()


def _gpu_wait(ch: KVChannel, work: _GpuWork, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ch._wait`` on its CUDA path, with a 30 s deadline."""
    monkeypatch.setattr(ch, "_is_cuda", True)
    ch._wait(work, time.monotonic() + 30, "transfer 7")


@pytest.mark.parametrize("goodbye", [True, False])
def test_a_wait_mid_transfer_ends_when_the_receiver_goes(
        decode_store: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        goodbye: bool) -> None:
    """The prefill end waits for a send that will never complete, because the decode end
    went away (it closed the channel at shutdown: goodbye; or it broke it: the connection
    just closes): the wait ends on the doorbell connection, not on its 30 s deadline, and
    only a broken channel is logged as a warning."""
    with _pair(decode_store) as (tx, rx), caplog.at_level(logging.INFO, KV_LOGGER):
        if goodbye:
            rx.close(abort=True)
        else:
            rx._fail("test: a garbled trailer")
        want = "the decode end closed the channel" if goodbye else "the decode end is gone"
        with pytest.raises(ChannelClosed, match=f"transfer 7: {want}"):
            _gpu_wait(tx, _GpuWork(), monkeypatch)
        assert tx.closed
    levels = [r.levelno for r in caplog.records if "the decode end" in r.getMessage()]
    assert levels == [logging.INFO if goodbye else logging.WARNING]


def test_a_wait_mid_transfer_ends_when_the_sender_leaves(
        decode_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode end waits for data from a prefill end that shut down midway."""
    with _pair(decode_store) as (tx, rx):
        tx.close(abort=True)
        with pytest.raises(ChannelClosed, match="the prefill end closed the channel"):
            _gpu_wait(rx, _GpuWork(), monkeypatch)


def test_a_sender_to_a_receiver_that_left_is_told_so_quietly(
        decode_store: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A decode worker shut down on purpose (scale-down): the prefill end's next transfer
    fails with the reason, as news, not as the transport's reset connection and a
    warning."""
    with _pair(decode_store) as (tx, rx), caplog.at_level(logging.INFO, KV_LOGGER):
        rx.close()
        with pytest.raises(ChannelClosed, match="the decode end closed the channel"):
            tx.send_blocks(make_header(SPEC, 1, 2), make_layers(SPEC, 2, seed=1))
        assert tx.closed
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_work_that_lands_after_the_peer_left_still_counts(
        decode_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the peer sent before it went may still be landing: work that completes within
    the grace after the peer is seen gone ends the wait normally."""
    with _pair(decode_store) as (tx, rx):
        tx.close()
        _gpu_wait(rx, _GpuWork(done_after_s=0.2), monkeypatch)
        assert not rx.closed


def test_a_header_waiting_on_the_doorbell_is_not_a_gone_peer(
        decode_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next transfer's header, in while the current one is waited for, is kept for
    recv_header(), and the peer is not taken for gone."""
    with _pair(decode_store) as (tx, rx):
        tx.send_header(make_header(SPEC, 5, 1))
        _gpu_wait(rx, _GpuWork(done_after_s=0.1), monkeypatch)
        assert not rx.closed
        monkeypatch.setattr(rx, "_is_cuda", False)
        assert rx.recv_header().transfer_id == 5


def test_closing_wakes_a_receiver_waiting_for_a_transfer(decode_store: Any) -> None:
    """Worker shutdown closes its channels from another thread: a receive loop waiting for
    the next transfer returns at once with ChannelClosed."""
    with _pair(decode_store) as (_tx, rx), ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_catch(lambda: rx.recv_header(timeout_s=60)))
        time.sleep(0.2)  # let it block (the outcome does not depend on it)
        rx.close(abort=True)
        err = waiting.result(timeout=30)
    assert isinstance(err, ChannelClosed), err


def test_a_racing_close_returns_only_once_teardown_is_done(decode_store: Any) -> None:
    """The receive thread (dead peer) and worker shutdown may close one end at once: the
    second caller must not return while the first is still tearing the group down."""
    with _pair(decode_store) as (_tx, rx), ThreadPoolExecutor(1) as pool:
        pg, in_abort, release = rx._pg, threading.Event(), threading.Event()
        torn_down: list[str] = []

        class SlowAbort:
            def abort(self) -> None:
                in_abort.set()
                release.wait(30)
                pg.abort()
                torn_down.append("abort")

            def __getattr__(self, name: str) -> Any:
                return getattr(pg, name)

        rx._pg = SlowAbort()
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


def test_garbled_doorbell_closes_the_channel(decode_store: Any) -> None:
    """The doorbell carries the header: garbage there is a protocol failure (the receiver
    cannot know what follows), so the channel is closed, not left out of step."""
    with _pair(decode_store) as (tx, rx):
        raw = bytearray(make_header(SPEC, 1, 1).to_bytes())
        raw[0] ^= 0xFF  # magic
        tx._bell.ring(bytes(raw), 5.0)
        with pytest.raises(ChannelClosed, match="garbled header: bad header magic"):
            rx.recv_header(timeout_s=5)
        assert rx.closed


def test_stalled_sender_closes_the_channel(decode_store: Any) -> None:
    with _pair(decode_store, timeout_s=1.0) as (tx, rx):
        tx.send_header(make_header(SPEC, 1, 2))
        tx.send_layer(make_layers(SPEC, 2, seed=1)[0])  # ... and then the sender stalls
        rx.recv_header()
        rx.recv_layer()
        t0 = time.monotonic()
        with pytest.raises(ChannelClosed, match="receiving layer 1"):
            rx.recv_layer()
        assert 0.5 < time.monotonic() - t0 < 4
        assert rx.closed
        with pytest.raises(ChannelClosed, match="is closed"):
            rx.recv_header()


def test_sender_does_not_block_forever_on_a_dead_receiver(decode_store: Any) -> None:
    with _pair(decode_store, timeout_s=1.0) as (tx, _rx):
        t0 = time.monotonic()
        with pytest.raises(ChannelClosed):
            tx.send_blocks(make_header(SPEC, 1, 2), make_layers(SPEC, 2, seed=1))  # nobody receives
        assert time.monotonic() - t0 < 4
        assert tx.closed and not tx.busy
        with pytest.raises(ChannelClosed):
            tx.send_header(make_header(SPEC, 2, 2))


def test_misuse_is_rejected(decode_store: Any) -> None:
    name = channel_name("reuse")
    with _pair(decode_store, name=name) as (tx, rx):
        with pytest.raises(ChannelError, match="decode end"):
            tx.recv_header()
        with pytest.raises(ChannelError, match="prefill end"):
            rx.send_header(make_header(SPEC, 1, 1))
        with pytest.raises(ChannelError, match="num_layers"):
            tx.send_header(dataclasses.replace(make_header(SPEC, 1, 1), num_layers=2))
        with pytest.raises(ChannelError, match="send_header\\(\\) first"):
            tx.send_layer(torch.zeros(SPEC.layer_shape(1)))
        with pytest.raises(ValueError, match="at least 2"):
            rx.set_staging_slots(1)
        tx.send_header(make_header(SPEC, 1, 1))
        with pytest.raises(ChannelError, match="during a transfer"):
            tx.set_staging_slots(3)
    # names are never reused
    with pytest.raises(ChannelError, match="already used"), _pair(decode_store, name=name):
        pass


# ---- two processes ---------------------------------------------------------------------


def test_cross_process_round_trip_and_dead_peer(decode_store: Any) -> None:
    store, port = decode_store
    name = channel_name("xproc")
    spec = dataclasses.replace(SPEC, dtype="bfloat16")
    proc = mp.get_context("spawn").Process(target=prefill_process, args=(port, name))
    proc.start()
    try:
        rx = KVChannel.open(store=store, name=name, rank=1, spec=spec, device="cpu",
                            timeout_s=10, open_timeout_s=60)
        for tid in (1, 2, 3):
            h, got = _recv_checked(rx, tid, 1, tid + 1)
            assert h.first_token == 1000 + tid
            for a, b in zip(got, make_layers(spec, tid + 1, seed=tid), strict=True):
                assert torch.equal(a, b)
        rx.recv_header()
        rx.recv_layer()
        t0 = time.monotonic()
        with pytest.raises(ChannelClosed):
            rx.recv_layer()  # the peer died: noticed from the connection, not the timeout
        assert time.monotonic() - t0 < 10
        assert rx.closed
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 3
