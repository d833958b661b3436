"""``pdserve profile``'s KV transfer samples: whole requests' KV through the real channel
between two processes, or a documented prior where that cannot run.

The sender is this process, with the runner's own pool and the prefill worker's send path
(``OutgoingKV``: header, messages of several layers, trailer; timed from its start until it
left, as the worker reports ``TransferDone.seconds``). The receiver is a spawned process
with a pool of its own that receives each transfer into its blocks and verifies it, as a
decode worker does: over Gloo on the CPU, over NCCL between two GPUs. One GPU alone cannot
hold both ends of an NCCL pair, so there, as with ``--no-transfer``, a prior stands in.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

from pdserve.engine.config import blocks_for
from pdserve.engine.kv import ChannelSpec, connect_store, host_store, open_receiver, open_sender
from pdserve.engine.messages import Lease, PrefillTask
from pdserve.engine.secret import Secret
from pdserve.engine.sequence import SamplingParams
from pdserve.prefill_worker.kv_sender import OutgoingKV
from pdserve.prefill_worker.scheduler import PrefillSeq

CHANNEL = "pdserve-profile-kv"
TIMEOUT_S = 120.0
# Priors. CPU: the channel is a host copy through loopback, so a host memcpy's bandwidth
# (measured here) and a millisecond for the header, doorbell and Gloo round trips. One GPU:
# NCCL send/recv between two NVLink GPUs as DESIGN.md section 10 measured it on H200s
# (20 GB/s at 1 MB, 356 GB/s at 256 MB: about 50 us and 360 GB/s).
CPU_PRIOR_LATENCY_S = 1e-3
GPU_PRIOR_LATENCY_S = 50e-6
GPU_PRIOR_BYTES_PER_S = 360e9


@dataclass(frozen=True)
class TransferSamples:
    """Rows (bytes, seconds) measured through the channel, or a prior (no rows)."""

    rows: list[list[float]]
    note: str
    prior: tuple[float, float] | None = None  # (latency s, bytes/s) when not measured


def transfer_sizes(max_tokens: int, block_size: int, quick: bool) -> list[int]:
    """Token counts to send: one block, then x4 up to ``max_tokens``."""
    sizes, n = [], block_size
    while n < max_tokens:
        sizes.append(n)
        n *= 16 if quick else 4
    return [*sizes, max_tokens]


def host_copy_prior() -> tuple[float, float]:
    """(latency, bytes/s) of the CPU prior: 1 ms and a 256 MiB host copy's bandwidth (bytes
    copied a second, the median of five)."""
    n = 256 << 20
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return CPU_PRIOR_LATENCY_S, n / statistics.median(times)


def prior_samples(device: torch.device, why: str) -> TransferSamples:
    if device.type == "cuda":
        return TransferSamples([], f"prior ({why}): NCCL over NVLink as measured between two "
                               "H200s (DESIGN.md), 50 us + bytes / 360 GB/s",
                               (GPU_PRIOR_LATENCY_S, GPU_PRIOR_BYTES_PER_S))
    latency, bw = host_copy_prior()
    return TransferSamples([], f"prior ({why}): 1 ms + bytes / a host memcpy's "
                           f"{bw / 1e9:.2f} GB/s (measured here)", (latency, bw))


def measure_transfers(spec: ChannelSpec, pool: torch.Tensor, sizes: list[int], reps: int
                      ) -> TransferSamples:
    """Each size in ``sizes`` (tokens) sent from ``pool`` ``reps`` times after one untimed
    send; a row per size with the median seconds. Falls back to the prior when the pair
    cannot be built here (a single GPU)."""
    device = pool.device
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return prior_samples(device, "one GPU: an NCCL pair needs two")
    peer = "cuda:1" if device.type == "cuda" else "cpu"
    ctx = mp.get_context("spawn")
    ports, done = ctx.Queue(), ctx.Queue()
    count = len(sizes) * (reps + 1)
    max_blocks = blocks_for(max(sizes), spec.block_size)
    secret = Secret.generate()
    proc = ctx.Process(target=_receiver, daemon=True,
                       args=(spec, max_blocks, count, peer, torch.get_num_threads(), ports,
                             done, secret))
    proc.start()
    try:
        port = _get(ports, proc, "the receiver's port")
        tx = open_sender(store=connect_store("127.0.0.1", port, TIMEOUT_S), name=CHANNEL,
                         secret=secret, spec=spec, device=device, timeout_s=TIMEOUT_S,
                         owns_store=True)
        rows = []
        try:
            for n in sizes:
                times = [_send_once(tx, pool, n, spec.block_size, i) for i in range(reps + 1)]
                rows.append([float(spec.layer_bytes(blocks_for(n, spec.block_size))
                                   * spec.num_layers), statistics.median(times[1:])])
            _get(done, proc, "the receiver's end")  # every transfer verified over there
        finally:
            tx.close()
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    how = "Gloo over loopback" if device.type == "cpu" else "NCCL, cuda:0 -> cuda:1"
    return TransferSamples(rows, f"measured through the KV channel ({how}) between two "
                           f"processes, {len(sizes)} sizes, median of {reps}")


def _send_once(tx: Any, pool: torch.Tensor, num_tokens: int, block_size: int, i: int) -> float:
    """One whole request's KV as the prefill worker's send thread sends it; its seconds."""
    blocks = list(range(blocks_for(num_tokens, block_size)))
    lease = Lease("profile-receiver", f"t{i}", 1 + i, 0, len(blocks), TIMEOUT_S)
    task = PrefillTask(f"t{i}", tuple([1] * num_tokens), 0, SamplingParams(), lease)
    out = OutgoingKV(PrefillSeq(task, blocks, 0.0), tx, threading.Lock(), pool,
                     layerwise=False)
    out.start()
    out.send_all_layers()
    return out.finish(0, wait=True)


def _get(q: Any, proc: Any, what: str) -> Any:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            if not proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"transfer profile: no {what} (receiver exit code "
                                   f"{proc.exitcode})") from None


def _receiver(spec: ChannelSpec, num_blocks: int, count: int, device: str, threads: int,
              ports: Any, done: Any, secret: Secret) -> None:
    """The decode end, in a process of its own: ``count`` transfers into its pool."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    pool = torch.zeros((spec.num_layers, *spec.layer_shape(num_blocks)),
                       dtype=spec.torch_dtype, device=dev)
    store, port = host_store("127.0.0.1", 0, TIMEOUT_S)
    ports.put(port)
    rx = open_receiver(store=store, name=CHANNEL, secret=secret, spec=spec, device=dev,
                       timeout_s=TIMEOUT_S, owns_store=True)
    try:
        for _ in range(count):
            header = rx.recv_header(timeout_s=TIMEOUT_S)
            ids = torch.arange(header.num_blocks, dtype=torch.int64, device=dev)
            rx.recv_pool_blocks(header, pool, ids)
    finally:
        rx.close()
    done.put(count)
