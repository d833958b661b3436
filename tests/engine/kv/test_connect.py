"""Opening KV channels (engine/kv/connect.py): the handshake, channel names and stores, and a
channel to a prefill end in a process of its own."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
import torch.distributed as dist

from pdserve.engine.kv import (
    ChannelClosed,
    ChannelError,
    HandshakeError,
    KVReceiver,
    host_store,
    open_receiver,
    open_sender,
)
from pdserve.engine.kv.connect import namespace
from pdserve.engine.secret import Secret
from pdserve_testing.kv import (
    HOST,
    OPEN_TIMEOUT_S,
    SECRET,
    SPEC,
    both,
    catch,
    channel_name,
    client,
    make_header,
    make_layers,
    pair,
    prefill_process,
    recv_checked,
    recv_layer,
    send_blocks,
)


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
        if rank == 0:
            open_sender(secret=SECRET,
                        store=client(port), name=name, spec=specs[rank], device="cpu",
                        timeout_s=5, open_timeout_s=OPEN_TIMEOUT_S)
        else:
            open_receiver(secret=SECRET, store=store, name=name, spec=specs[rank], device="cpu",
                          timeout_s=5, open_timeout_s=OPEN_TIMEOUT_S)

    errs = both(catch(lambda: open_end(0)), catch(lambda: open_end(1)))
    want = f"{field}: prefill={prefill_value} decode={decode_value}"
    for err in errs:
        assert isinstance(err, HandshakeError), err
        assert want in str(err)


def test_handshake_lists_every_difference(decode_store: Any) -> None:
    store, port = decode_store
    name = channel_name("hs")
    specs = [SPEC, dataclasses.replace(SPEC, num_layers=4, head_dim=16, kv_layout="L,N,2")]
    def open_end(rank: int) -> None:
        if rank == 0:
            open_sender(secret=SECRET,
                        store=client(port), name=name, spec=specs[rank], device="cpu",
                        timeout_s=5, open_timeout_s=OPEN_TIMEOUT_S)
        else:
            open_receiver(secret=SECRET, store=store, name=name, spec=specs[rank], device="cpu",
                          timeout_s=5, open_timeout_s=OPEN_TIMEOUT_S)

    for err in both(catch(lambda: open_end(0)), catch(lambda: open_end(1))):
        assert isinstance(err, HandshakeError)
        msg = str(err)
        for part in ("num_layers: prefill=3 decode=4", "head_dim: prefill=8 decode=16",
                     "kv_layout: prefill=L,2,N,bs,Hk,D decode=L,N,2"):
            assert part in msg
        assert "block_size" not in msg


def test_ends_with_other_secrets_never_meet(decode_store: Any) -> None:
    """An end without the deployment's secret finds no channel to join: its keys and the
    channel's live under different prefixes, so neither sees the other's spec, and a store
    client that knows only the name sees nothing of the channel."""
    store, port = decode_store
    name = channel_name("secret")
    other = Secret(b"a-stray-process-guess-at-the-key")

    def open_end(rank: int) -> None:
        if rank == 0:
            open_sender(secret=other, store=client(port), name=name, spec=SPEC, device="cpu",
                        timeout_s=5, open_timeout_s=2)
        else:
            open_receiver(secret=SECRET, store=store, name=name, spec=SPEC, device="cpu",
                          timeout_s=5, open_timeout_s=2)

    for err in both(catch(lambda: open_end(0)), catch(lambda: open_end(1))):
        assert isinstance(err, ChannelError) and "did not join" in str(err), err
    peek = dist.PrefixStore(f"pdserve/kv/{name}/", client(port))
    assert not peek.check(["spec/0"]) and not peek.check(["spec/1"])
    assert namespace(name, SECRET) != namespace(name, other)


def test_one_prefill_two_decoders(decode_store: Any) -> None:
    other = host_store(HOST, 0, timeout_s=OPEN_TIMEOUT_S)
    with pair(decode_store, name="p0-to-d") as (tx_a, rx_a), \
            pair(other, name="p0-to-d") as (tx_b, rx_b):  # same name, other decoder's store
        def send() -> None:
            for i in range(3):  # interleaved transfers on the two channels
                send_blocks(tx_a, make_header(SPEC, 10 + i, 2), make_layers(SPEC, 2, seed=10 + i))
                send_blocks(tx_b, make_header(SPEC, 20 + i, 1), make_layers(SPEC, 1, seed=20 + i))

        def recv(rx: KVReceiver, base: int, n: int) -> Callable[[], list[list[torch.Tensor]]]:
            return lambda: [recv_checked(rx, base + i, 1, n)[1] for i in range(3)]

        with ThreadPoolExecutor(3) as pool:
            fs = pool.submit(send)
            fa, fb = pool.submit(recv(rx_a, 10, 2)), pool.submit(recv(rx_b, 20, 1))
            fs.result(30)
            got_a, got_b = fa.result(30), fb.result(30)
    for i in range(3):
        want_a, want_b = make_layers(SPEC, 2, 10 + i), make_layers(SPEC, 1, 20 + i)
        assert all(torch.equal(a, b) for a, b in zip(got_a[i], want_a, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(got_b[i], want_b, strict=True))


def test_cross_process_round_trip_and_dead_peer(decode_store: Any) -> None:
    store, port = decode_store
    name = channel_name("xproc")
    spec = dataclasses.replace(SPEC, dtype="bfloat16")
    proc = mp.get_context("spawn").Process(target=prefill_process, args=(port, name))
    proc.start()
    try:
        rx = open_receiver(secret=SECRET,
                           store=store, name=name, spec=spec, device="cpu", timeout_s=10,
                           open_timeout_s=60)
        for tid in (1, 2, 3):
            h, got = recv_checked(rx, tid, 1, tid + 1)
            assert h.first_token == 1000 + tid
            for a, b in zip(got, make_layers(spec, tid + 1, seed=tid), strict=True):
                assert torch.equal(a, b)
        rx.recv_header()
        recv_layer(rx)
        t0 = time.monotonic()
        with pytest.raises(ChannelClosed):
            recv_layer(rx)  # the peer died: noticed from the connection, not the timeout
        assert time.monotonic() - t0 < 10
        assert rx.closed
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 3
