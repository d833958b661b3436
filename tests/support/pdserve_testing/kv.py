"""KV channel test helpers: channel specs, deterministic layers and headers, and the prefill
ends that tests start in processes of their own (spawned children import them from here)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch

from pdserve.engine.kv_transfer import ChannelClosed, ChannelSpec, KVChannel, TransferHeader

SPEC = ChannelSpec(
    fingerprint="0123456789abcdef", dtype="float32", block_size=4, num_layers=3,
    num_kv_heads=2, head_dim=8,
)
HOST = "127.0.0.1"
_NAMES = itertools.count()


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


def prefill_process(port: int, name: str) -> None:
    """Child: the prefill end. Three good bf16 transfers, then dies mid-transfer."""
    spec = dataclasses.replace(SPEC, dtype="bfloat16")
    store = KVChannel.connect_store(HOST, port, timeout_s=60)
    ch = KVChannel.open(store=store, name=name, rank=0, spec=spec, device="cpu", timeout_s=10,
                        open_timeout_s=60)
    for tid in (1, 2, 3):
        ch.send_blocks(make_header(spec, tid, tid + 1), make_layers(spec, tid + 1, seed=tid))
    ch.send_header(make_header(spec, 4, 2))
    ch.send_layer(make_layers(spec, 2, seed=4)[0])
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


def gpu_sender(port: int, name: str, timeout_s: float) -> tuple[Any, KVChannel]:
    """The prefill process's end of a two-GPU test channel (cuda:0)."""
    torch.cuda.set_device(0)
    store = KVChannel.connect_store(HOST, port, timeout_s=120)
    return store, KVChannel.open(store=store, name=name, rank=0, spec=GPU_SPEC,
                                 device="cuda:0", timeout_s=timeout_s, open_timeout_s=120)


def nccl_prefill(port: int, name: str) -> None:
    _store, ch = gpu_sender(port, name, timeout_s=10)
    for tid, n in GPU_PLAN:
        layers = gpu_layers(GPU_SPEC, n, tid, "cuda:0")
        ch._send_hook = (lambda layer, t: t.neg() if layer == 3 else t) \
            if tid == GPU_CORRUPT else None
        ch.send_header(make_header(GPU_SPEC, tid, n))
        for t in layers:
            ch.send_layer(t)
        ch.finish()
    ch._send_hook = None
    ch.send_header(make_header(GPU_SPEC, 99, 2))
    ch.send_layer(gpu_layers(GPU_SPEC, 2, 99, "cuda:0")[0])
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
        ch.send_pool_blocks(h, pool, ids, first_token=tid)
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
    assert not ch.busy and ch.total_transfers == len(GPU_PIPELINE_PLAN)
    store.wait(["done"])
    ch.close()


def nccl_abandoned_prefill(port: int, name: str) -> None:
    """Sends one transfer that the receiver gives up on midway, and reports what finish()
    said. Its timeout is long (60 s): the test fails if that is what ended the wait."""
    store, ch = gpu_sender(port, name, timeout_s=60)
    pool = gpu_pool(GPU_SPEC, 300, "cuda:0")
    h = dataclasses.replace(make_header(GPU_SPEC, 1, 256), layers_per_message=4)
    try:
        ch.send_pool_blocks(h, pool, torch.arange(256, device="cuda:0"))
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
