"""The KV channel over NCCL between two GPUs: round trips, corruption, staging slots,
pipelined transfers, and either end leaving midway. The prefill end runs in a spawned
process (pdserve_testing.kv); these run without pytest fixtures, so they also run as plain
functions on a GPU machine."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
import torch

from pdserve.engine.kv import (
    ChannelClosed,
    KVReceiver,
    TransferError,
    TransferTimeout,
    host_store,
    open_receiver,
)
from pdserve_testing.kv import (
    GPU_CORRUPT,
    GPU_PIPELINE_PLAN,
    GPU_PLAN,
    GPU_POOL_PLAN,
    GPU_SPEC,
    HOST,
    SECRET,
    channel_name,
    gpu_layers,
    gpu_pool,
    match,
    nccl_abandoned_prefill,
    nccl_leaving_prefill,
    nccl_pipelined_prefill,
    nccl_pool_prefill,
    nccl_prefill,
    recv_layer,
)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_nccl_two_gpus_round_trip_corruption_dead_peer() -> None:
    with _gpu_receiver(nccl_prefill, "nccl", timeout_s=10) as (_store, rx, proc):
        for tid, n in GPU_PLAN:
            h = rx.recv_header()
            match(rx, h, tid, 1, n)
            want = gpu_layers(GPU_SPEC, n, tid, "cuda:1")
            equal = []
            for layer in range(h.num_layers):
                buf = recv_layer(rx)
                assert buf.device == torch.device("cuda:1")
                equal.append(torch.equal(buf, want[layer]))
            if tid == GPU_CORRUPT:
                with pytest.raises(TransferError, match=f"checksum mismatch for transfer {tid}"):
                    rx.verify()
                assert equal.count(False) == 1
                continue
            rx.verify()
            assert all(equal), (tid, equal)
        gbps = rx.stats.last_bytes / rx.stats.last_seconds / 1e9
        print(f"NCCL KV transfer: {rx.stats.last_bytes / 2**20:.0f} MiB in "
              f"{rx.stats.last_seconds * 1e3:.2f} ms = {gbps:.1f} GB/s (incl. checksums)")
        h = rx.recv_header()
        t0 = time.monotonic()
        with pytest.raises(ChannelClosed):  # the peer died mid-transfer: deadline, abort()
            for _ in range(h.num_layers):
                recv_layer(rx)  # queued on CUDA; the stall surfaces in verify()
            rx.verify()
        assert time.monotonic() - t0 < 30
        assert rx.closed
    assert proc.exitcode == 3


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_nccl_pool_transfers_with_staging_slots() -> None:
    """NCCL pool to pool, 256 blocks of 32 layers, with 2 to 4 staging buffers on each side
    and 1 to 5 layers per message (receives posted ahead): every block lands where the
    receiver asked, the checksum verifies, and the transfers line up back to back. Before
    the first, the idle receiver's doorbell waits time out harmlessly and the channel then
    takes the first transfer."""
    with _gpu_receiver(nccl_pool_prefill, "nccl-pool", timeout_s=20) as (store, rx, proc):
        want = gpu_pool(GPU_SPEC, 300, "cuda:1")[:, :, 44:300].flip(2)
        dst_ids = torch.randperm(300, generator=torch.Generator().manual_seed(1))[:256]
        for _ in range(2):
            with pytest.raises(TransferTimeout):
                rx.recv_header(timeout_s=0.3)
        assert not rx.closed and not rx.busy
        store.set("go", "1")
        for tid, (slots, _k) in enumerate(GPU_POOL_PLAN):
            rx.set_staging_slots(slots)
            dst = torch.full((GPU_SPEC.num_layers, 2, 300, GPU_SPEC.block_size,
                              GPU_SPEC.num_kv_heads, GPU_SPEC.head_dim), float("nan"),
                             dtype=GPU_SPEC.torch_dtype, device="cuda:1")
            h = rx.recv_header()
            match(rx, h, tid, 1, 256)
            got = rx.recv_pool_blocks(h, dst, dst_ids.to("cuda:1"))
            assert got.first_token == tid
            assert torch.equal(dst[:, :, dst_ids.to("cuda:1")], want), (slots, _k)
        rx.close()
    assert proc.exitcode == 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_nccl_pipelined_transfers() -> None:
    """NCCL, the sender pipelined as under load: each transfer departs once its trailer is
    posted and the next starts at once, its packs and sends queued behind (the running
    checksum, staging buffers reused and grown across transfers), while another thread
    waits for each departure. Every block of every transfer lands where the receiver asked
    and every checksum verifies."""
    with _gpu_receiver(nccl_pipelined_prefill, "nccl-pipe", timeout_s=20) as (store, rx, proc):
        for tid, (n, _k) in enumerate(GPU_PIPELINE_PLAN):
            want = gpu_pool(GPU_SPEC, 300, "cuda:1", seed=tid)[:, :, :n].flip(2)
            dst_ids = torch.randperm(300, generator=torch.Generator().manual_seed(tid))[:n]
            dst = torch.full((GPU_SPEC.num_layers, 2, 300, GPU_SPEC.block_size,
                              GPU_SPEC.num_kv_heads, GPU_SPEC.head_dim), float("nan"),
                             dtype=GPU_SPEC.torch_dtype, device="cuda:1")
            h = rx.recv_header()
            match(rx, h, tid, 1, n)
            got = rx.recv_pool_blocks(h, dst, dst_ids.to("cuda:1"))
            assert got.first_token == tid
            assert torch.equal(dst[:, :, dst_ids.to("cuda:1")], want), tid
        store.set("done", "1")
        rx.close()
    assert proc.exitcode == 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_nccl_sender_sees_the_receiver_break_the_channel() -> None:
    """The decode end breaks the channel midway through a transfer (as on a garbled trailer):
    the prefill end's sends to the aborted communicator never complete, and its wait ends on
    the closed doorbell connection, not on its 60 s timeout."""
    with _gpu_receiver(nccl_abandoned_prefill, "nccl-abandon", timeout_s=60) as (
            store, rx, proc):
        h = rx.recv_header()
        match(rx, h, 1, 1, 256)
        dst = gpu_pool(GPU_SPEC, 300, "cuda:1")
        first = h.message_layers(0)
        rx.recv_into_pool(dst[first.start:first.stop], torch.arange(256, device="cuda:1"))
        rx._end.fail("test: the decode end gives up")  # aborts, closes the doorbell
        assert rx.closed
        store.wait(["result"], timedelta(seconds=120))
        result = store.get("result").decode()
        assert "the decode end is gone" in result, result
        assert "timed out" not in result, result
    assert proc.exitcode == 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_nccl_receiver_sees_the_sender_leave_midway() -> None:
    """The prefill end closes midway through a transfer (shutdown): it says goodbye, and the
    decode end's verify() ends on it, as a peer that left, not on its 60 s timeout."""
    with _gpu_receiver(nccl_leaving_prefill, "nccl-leave", timeout_s=60) as (
            store, rx, proc):
        h = rx.recv_header()
        match(rx, h, 1, 1, 256)
        dst = gpu_pool(GPU_SPEC, 300, "cuda:1")
        ids = torch.arange(256, device="cuda:1")
        store.set("taken", "1")
        with pytest.raises(ChannelClosed) as info:
            for m in range(h.num_messages):
                layers = h.message_layers(m)
                rx.recv_into_pool(dst[layers.start:layers.stop], ids)
            rx.verify()
        store.set("done", "1")
        assert "the prefill end closed the channel" in str(info.value), info.value
        assert rx.closed
    assert proc.exitcode == 0


@contextmanager
def _gpu_receiver(prefill: Callable[[int, str], None], tag: str,
                  timeout_s: float) -> Iterator[tuple[Any, KVReceiver, Any]]:
    """Start ``prefill(port, name)`` in a process of its own and open the decode end
    (cuda:1); yields the decode store, the channel and the process (joined on exit)."""
    store, port = host_store(HOST, 0, timeout_s=120)
    name = channel_name(tag)
    proc = mp.get_context("spawn").Process(target=prefill, args=(port, name))
    proc.start()
    try:
        yield store, open_receiver(secret=SECRET,
                                   store=store, name=name, spec=GPU_SPEC, device="cuda:1",
                                   timeout_s=timeout_s, open_timeout_s=120), proc
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
