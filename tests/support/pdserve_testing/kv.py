"""KV channel test helpers: channel specs, deterministic layers and headers, whole-transfer
and one-layer conveniences over the sender and receiver, a pair of channel ends over threads,
and the prefill ends that tests start in processes of their own (spawned children import them
from here)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import Tensor

from pdserve.engine.kv import (
    ChannelClosed,
    ChannelError,
    ChannelSpec,
    KVReceiver,
    KVSender,
    TransferError,
    TransferHeader,
    connect_store,
    match_header,
    open_receiver,
    open_sender,
)
from pdserve.engine.secret import Secret

SPEC = ChannelSpec(
    fingerprint="0123456789abcdef", dtype="float32", block_size=4, num_layers=3,
    num_kv_heads=2, head_dim=8,
)
HOST = "127.0.0.1"
_NAMES = itertools.count()

# The deployment secret of the channels the tests open (every process computes the same).
SECRET = Secret(b"pdserve-tests-kv-channel-secret!")


def channel_name(tag: str) -> str:
    return f"{tag}-{os.getpid()}-{next(_NAMES)}"


def make_layers(spec: ChannelSpec, num_blocks: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(spec.layer_shape(num_blocks), generator=g).to(spec.torch_dtype)
        for _ in range(spec.num_layers)
    ]


def make_header(spec: ChannelSpec, tid: int, num_blocks: int, epoch: int = 1) -> TransferHeader:
    return TransferHeader.for_spec(
        spec, transfer_id=tid, epoch=epoch, num_blocks=num_blocks,
        num_tokens=max(0, num_blocks * spec.block_size - 1), first_token=1000 + tid,
    )


# ---- one layer, whole transfers ------------------------------------------------------


def send_layer(tx: KVSender, t: Tensor) -> None:
    """:meth:`KVSender.send_message` for a one-layer message (``layers_per_message == 1``):
    ``t`` is ``[2, n, bs, Hk, D]``."""
    h = tx.current
    if h is not None and h.layers_per_message != 1:
        raise ChannelError(
            f"send_layer in transfer {h.transfer_id}, whose messages hold "
            f"{h.layers_per_message} layers; use send_message"
        )
    tx.send_message(t.unsqueeze(0))


def send_blocks(tx: KVSender, header: TransferHeader, layers: Iterable[Tensor]) -> None:
    """``send_header``, ``send_message`` for each packed message (``[2, n, ...]`` layers are
    taken as one-layer messages), ``finish``. If ``layers`` raises (e.g. packing failed), the
    transfer is cancelled and the error re-raised."""
    tx.send_header(header)
    try:
        for t in layers:
            tx.send_message(t.unsqueeze(0) if t.dim() == 5 else t)
    except Exception:
        if tx.current is not None and not tx.closed:
            tx.cancel()
        raise
    tx.finish()


def send_pool_blocks(tx: KVSender, header: TransferHeader, pool: Tensor, block_ids: Tensor,
                     first_token: int = -1) -> None:
    """A whole transfer from the pool ``[L, 2, N, bs, Hk, D]``: header, every message with
    ``send_from_pool``, trailer; waits until it left."""
    tx.send_header(header)
    for m in range(header.num_messages):
        layers = header.message_layers(m)
        tx.send_from_pool(pool[layers.start:layers.stop], block_ids)
    tx.finish(first_token)


def match(rx: KVReceiver, header: TransferHeader, expected_transfer_id: int,
          expected_epoch: int, expected_blocks: int) -> None:
    """``match_header``, draining the rejected transfer before raising so that the channel
    stays in sync (as the decode worker does)."""
    try:
        match_header(header, expected_transfer_id, expected_epoch, expected_blocks)
    except TransferError:
        if rx.current == header:
            rx.discard()
        raise


def recv_layer(rx: KVReceiver, out: Tensor | None = None) -> Tensor:
    """:meth:`KVReceiver.recv_message` for a one-layer message: returns
    ``[2, n, bs, Hk, D]``."""
    h = rx.current
    if h is not None and h.layers_per_message != 1:
        raise ChannelError(
            f"recv_layer in transfer {h.transfer_id}, whose messages hold "
            f"{h.layers_per_message} layers; use recv_message"
        )
    buf = rx.recv_message(None if out is None else out.unsqueeze(0))[0]
    return buf if out is None else out


def recv_blocks(
    rx: KVReceiver,
    resolve: Callable[[TransferHeader], Callable[[int, Tensor], None]],
    timeout_s: float | None = None,
) -> TransferHeader:
    """Receive one whole transfer. ``resolve(header)`` checks the header against the caller's
    reservation (raise to reject) and returns a sink ``(layer, buf)`` that consumes each
    layer ``[2, n, bs, Hk, D]``. Rejections and sink errors drain the transfer and re-raise;
    ``verify`` runs at the end."""
    header = rx.recv_header(timeout_s)
    try:
        sink = resolve(header)
        for m in range(header.num_messages):
            buf = rx.recv_message()
            for i, layer in enumerate(header.message_layers(m)):
                sink(layer, buf[i])
    except Exception:
        if not rx.closed:
            rx.discard()
        raise
    return rx.verify()


def recv_checked(rx: KVReceiver, tid: int, epoch: int, num_blocks: int) -> tuple[
        TransferHeader, list[Tensor]]:
    """One transfer of one-layer messages, matched and verified; returns its header and
    layers."""
    h = rx.recv_header()
    match(rx, h, tid, epoch, num_blocks)
    got = [recv_layer(rx).clone() for _ in range(h.num_layers)]
    rx.verify()
    return h, got


# ---- a pair of ends over threads -----------------------------------------------------

T = TypeVar("T")
U = TypeVar("U")

# Opening waits generously: in some sandboxes an occasional TCP connect to the store stalls
# for seconds. Per-operation timeouts stay short.
OPEN_TIMEOUT_S = 30.0


def both(send: Callable[[], T], recv: Callable[[], U], timeout: float = 30) -> tuple[T, U]:
    """Run the two ends concurrently; re-raise the first error."""
    with ThreadPoolExecutor(2) as pool:
        fs, fr = pool.submit(send), pool.submit(recv)
        return fs.result(timeout), fr.result(timeout)


def catch(fn: Callable[[], Any]) -> Callable[[], BaseException | None]:
    """``fn`` returning what it raised (None if nothing)."""
    def run() -> BaseException | None:
        try:
            fn()
        except BaseException as e:
            return e
        return None

    return run


_clients: dict[int, torch.distributed.TCPStore] = {}


def client(port: int) -> torch.distributed.TCPStore:
    """The prefill process's connection to a decode store (one per store, like a worker)."""
    if port not in _clients:
        _clients[port] = connect_store(HOST, port, timeout_s=OPEN_TIMEOUT_S)
    return _clients[port]


@contextmanager
def pair(
    decode_store: tuple[torch.distributed.TCPStore, int],
    spec: ChannelSpec = SPEC,
    decode_spec: ChannelSpec | None = None,
    timeout_s: float = 5.0,
    name: str | None = None,
) -> Iterator[tuple[KVSender, KVReceiver]]:
    """Both ends of a fresh Gloo channel on this host, opened concurrently; closed after."""
    store, port = decode_store
    name = name or channel_name("pair")
    tx, rx = both(
        lambda: open_sender(secret=SECRET, store=client(port), name=name, spec=spec, device="cpu",
                            timeout_s=timeout_s, open_timeout_s=OPEN_TIMEOUT_S,
                            gloo_host=HOST),
        lambda: open_receiver(secret=SECRET,
                              store=store, name=name, spec=decode_spec or spec, device="cpu",
                              timeout_s=timeout_s, open_timeout_s=OPEN_TIMEOUT_S,
                              gloo_host=HOST),
    )
    try:
        yield tx, rx
    finally:
        tx.close()
        rx.close()


def pool_of(spec: ChannelSpec, num_blocks: int, seed: int) -> Tensor:
    """A random CPU KV pool ``[L, 2, num_blocks, bs, Hk, D]``."""
    g = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads,
             spec.head_dim)
    return torch.randn(shape, generator=g).to(spec.torch_dtype)


def prefill_process(port: int, name: str) -> None:
    """Child: the prefill end. Three good bf16 transfers, then dies mid-transfer."""
    spec = dataclasses.replace(SPEC, dtype="bfloat16")
    store = connect_store(HOST, port, timeout_s=60)
    ch = open_sender(secret=SECRET, store=store, name=name, spec=spec, device="cpu", timeout_s=10,
                     open_timeout_s=60)
    for tid in (1, 2, 3):
        send_blocks(ch, make_header(spec, tid, tid + 1), make_layers(spec, tid + 1, seed=tid))
    ch.send_header(make_header(spec, 4, 2))
    send_layer(ch, make_layers(spec, 2, seed=4)[0])
    time.sleep(0.5)  # let layer 0 leave, then die without a goodbye
    os._exit(3)


GPU_SPEC = ChannelSpec(  # Llama-3.1-8B geometry
    fingerprint="0123456789abcdef", dtype="bfloat16", block_size=16, num_layers=32,
    num_kv_heads=8, head_dim=128,
)


GPU_PLAN = [(1, 1), (2, 3), (3, 5), (4, 2), (5, 4), (6, 256)]  # (transfer_id, num_blocks)


GPU_CORRUPT = 4


def gpu_layers(spec: ChannelSpec, n: int, seed: int, device: str) -> list[torch.Tensor]:
    shape = spec.layer_shape(n)
    numel = 1
    for d in shape:
        numel *= d
    base = torch.arange(numel, device=device, dtype=torch.int64)
    return [((base * (seed + 3 + layer)) % 251 - 125).to(spec.torch_dtype).view(shape)
            for layer in range(spec.num_layers)]


def gpu_sender(port: int, name: str, timeout_s: float) -> tuple[Any, KVSender]:
    """The prefill process's end of a two-GPU test channel (cuda:0)."""
    torch.cuda.set_device(0)
    store = connect_store(HOST, port, timeout_s=120)
    return store, open_sender(secret=SECRET, store=store, name=name, spec=GPU_SPEC, device="cuda:0",
                              timeout_s=timeout_s, open_timeout_s=120)


def nccl_prefill(port: int, name: str) -> None:
    _store, ch = gpu_sender(port, name, timeout_s=10)
    for tid, n in GPU_PLAN:
        layers = gpu_layers(GPU_SPEC, n, tid, "cuda:0")
        ch._send_hook = (lambda layer, t: t.neg() if layer == 3 else t) \
            if tid == GPU_CORRUPT else None
        ch.send_header(make_header(GPU_SPEC, tid, n))
        for t in layers:
            send_layer(ch, t)
        ch.finish()
    ch._send_hook = None
    ch.send_header(make_header(GPU_SPEC, 99, 2))
    send_layer(ch, gpu_layers(GPU_SPEC, 2, 99, "cuda:0")[0])
    torch.cuda.synchronize()
    time.sleep(1.0)
    os._exit(3)  # dies mid-transfer


GPU_POOL_PLAN = [(2, 1), (3, 2), (4, 5), (2, 3)]  # (staging_slots, layers_per_message)


def gpu_pool(spec: ChannelSpec, num_blocks: int, device: str, seed: int = 7) -> torch.Tensor:
    shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(spec.torch_dtype).to(device)


def nccl_pool_prefill(port: int, name: str) -> None:
    store, ch = gpu_sender(port, name, timeout_s=20)
    pool = gpu_pool(GPU_SPEC, 300, "cuda:0")
    ids = torch.arange(299, 43, -1, device="cuda:0")  # 256 blocks, reversed
    store.wait(["go"])  # after the receiver's idle waits
    for tid, (slots, k) in enumerate(GPU_POOL_PLAN):
        ch.set_staging_slots(slots)
        h = dataclasses.replace(make_header(GPU_SPEC, tid, len(ids)), layers_per_message=k)
        send_pool_blocks(ch, h, pool, ids, first_token=tid)
    ch.close()


# (blocks, layers per message): a smaller transfer, then one that grows the staging buffers
# while the ones before it still depart
GPU_PIPELINE_PLAN = [(256, 8), (256, 8), (40, 8), (280, 16), (256, 8)]


def nccl_pipelined_prefill(port: int, name: str) -> None:
    store, ch = gpu_sender(port, name, timeout_s=20)
    pools = []
    with ThreadPoolExecutor(1) as finisher:  # waits for each departure, as the worker's does
        waits = []
        for tid, (n, k) in enumerate(GPU_PIPELINE_PLAN):
            pools.append(pool := gpu_pool(GPU_SPEC, 300, "cuda:0", seed=tid))
            ids = torch.arange(n, device="cuda:0").flip(0)
            h = dataclasses.replace(make_header(GPU_SPEC, tid, n), layers_per_message=k)
            ch.send_header(h)  # the transfers before may still be leaving
            for m in range(h.num_messages):
                layers = h.message_layers(m)
                ch.send_from_pool(pool[layers.start:layers.stop], ids)
            waits.append(finisher.submit(ch.wait_finished, ch.finish(tid, wait=False)))
        for w in waits:
            w.result(60)
    assert not ch.busy and ch.stats.transfers == len(GPU_PIPELINE_PLAN)
    store.wait(["done"])
    ch.close()


def nccl_abandoned_prefill(port: int, name: str) -> None:
    """Sends one transfer that the receiver gives up on midway, and reports what finish()
    said. Its timeout is long (60 s): the test fails if that is what ended the wait."""
    store, ch = gpu_sender(port, name, timeout_s=60)
    pool = gpu_pool(GPU_SPEC, 300, "cuda:0")
    h = dataclasses.replace(make_header(GPU_SPEC, 1, 256), layers_per_message=4)
    try:
        send_pool_blocks(ch, h, pool, torch.arange(256, device="cuda:0"))
        store.set("result", "sent")
    except ChannelClosed as e:
        store.set("result", str(e))
    ch.close()


def nccl_leaving_prefill(port: int, name: str) -> None:
    """Starts a transfer, then shuts down midway (closes on purpose, as a worker stopping)."""
    store, ch = gpu_sender(port, name, timeout_s=60)
    pool = gpu_pool(GPU_SPEC, 300, "cuda:0")
    ids = torch.arange(256, device="cuda:0")
    h = dataclasses.replace(make_header(GPU_SPEC, 1, 256), layers_per_message=4)
    ch.send_header(h)
    for m in range(2):
        layers = h.message_layers(m)
        ch.send_from_pool(pool[layers.start:layers.stop], ids)
    store.wait(["taken"], timedelta(seconds=120))
    ch.close(abort=True)
    store.wait(["done"], timedelta(seconds=120))
