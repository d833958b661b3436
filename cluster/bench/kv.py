"""KV transfer on two GPUs: layer-wise streaming against prefill alone, and channel
bandwidth against raw NCCL send/recv of the same bytes over the same process group.

    python -P -m pdserve.cluster.bench.kv --preset llama-3.1-8b --prompt-len 4096 --json out.json

Two processes (prefill on cuda:0, decode on cuda:1), the real KV channel (``engine.kv``) and
the real prefill path (``OutgoingKV`` hooked into the forward pass). Printed, all from one run:
- TTFT overhead: (prefill with layer-wise sending, to first token) / (prefill alone) - 1;
- time from the first token until the decode side has every layer unpacked and verified;
- channel bandwidth of a whole request's KV (pack + checksum, send in messages of several
  layers, receive, unpack + checksum, verify: from the sender's start until the decode side
  verified it) over raw NCCL send/recv of the same bytes in one message, timed the same way
  (over a communicator of its own between the same GPUs);
- sustained bandwidth: transfers back to back, the channel pipelined as the prefill worker
  sends under load, against raw NCCL with every message queued at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pdserve.engine.config import PRESETS, CacheConfig, ModelSpec, RunnerConfig, blocks_for
from pdserve.engine.kv import (
    STAGING_SLOTS,
    ChannelSpec,
    connect_store,
    host_store,
    make_nccl_group,
    open_receiver,
    open_sender,
)
from pdserve.engine.kv_cache import allocate_kv_pool
from pdserve.engine.messages import Lease, PrefillTask
from pdserve.engine.runner import ModelRunner, PrefillItem
from pdserve.engine.secret import Secret
from pdserve.engine.sequence import SamplingParams
from pdserve.prefill_worker.kv_sender import OutgoingKV
from pdserve.prefill_worker.scheduler import PrefillSeq

BLOCK = 16
DTYPE = torch.bfloat16
IDLE_S = 0.05  # before each timed send: the receiver is back at its doorbell by then


def _cache(n_blocks: int) -> CacheConfig:
    return CacheConfig(BLOCK, n_blocks, DTYPE)


def _raw_group(store: dist.Store, rank: int, dev: torch.device) -> Any:
    """The raw NCCL ceiling's own two-rank communicator between the same GPUs, built as the
    channel builds its own."""
    return make_nccl_group(dist.PrefixStore("bench-raw/", store), rank, dev, 120.0, "bench-raw")


class _GcPauses:
    """Every garbage collection from now on in this process: (start, seconds, generation),
    to tell a collector pause from a transfer's own stall."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float, int]] = []
        self._t0 = 0.0
        gc.callbacks.append(self._record)

    def _record(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append((self._t0, time.perf_counter() - self._t0, info["generation"]))


def _raw_exchange(pg: Any, rank: int, t: torch.Tensor, parts: int = 1) -> None:
    """Send (rank 0) or receive (rank 1) ``t`` in ``parts`` back-to-back messages, and wait
    until the GPU is done: no header, checksum, pack or doorbell."""
    op = pg.send if rank == 0 else pg.recv
    works = [op([chunk], 1 - rank, 0) for chunk in t.reshape(-1).view(torch.uint8).chunk(parts)]
    for w in works:
        w.wait()
    torch.cuda.synchronize(t.device)


def _raw_stream(pg: Any, rank: int, t: torch.Tensor, count: int, queued: bool) -> None:
    """``count`` whole-tensor messages back to back: all queued at once (``queued``, the
    ceiling), or each waited for before the next is posted."""
    if not queued:
        for _ in range(count):
            _raw_exchange(pg, rank, t)
        return
    op = pg.send if rank == 0 else pg.recv
    flat = t.reshape(-1).view(torch.uint8)
    for w in [op([flat], 1 - rank, 0) for _ in range(count)]:
        w.wait()
    torch.cuda.synchronize(t.device)


def _receiver(args: dict[str, Any], ports: Any, results: Any) -> None:
    dev = torch.device("cuda:1")
    torch.cuda.set_device(dev)
    cfg = PRESETS[args["preset"]]
    n = blocks_for(args["prompt_len"], BLOCK)
    pool = allocate_kv_pool(cfg, _cache(n + 8), dev)
    store, port = host_store("127.0.0.1", 0, 120.0)
    ports.put(port)
    ch = open_receiver(store=store, name="bench-kv", secret=Secret(args["secret"]),
                       spec=ChannelSpec.from_configs(cfg, _cache(n + 8)), device=dev,
                       timeout_s=120.0, owns_store=True)
    raw_pg = _raw_group(store, 1, dev)
    pauses = _GcPauses()
    ids = torch.arange(n, dtype=torch.int64, device=dev)
    done, landed, header_in, queued = [], [], [], []

    def receive() -> None:
        h = ch.recv_header(timeout_s=300.0)
        header_in.append(time.perf_counter())
        landed.append(ch.last_header_at)
        for m in range(h.num_messages):
            layers = h.message_layers(m)
            ch.recv_into_pool(pool[layers.start:layers.stop], ids)
        queued.append(time.perf_counter())
        # verify() returns once every layer is unpacked and the checksum read (a host sync
        # on the channel's stream), as the decode worker sees it; a device-wide sync here
        # would also wait for the next transfer's receives, posted during verify().
        ch.verify()
        done.append(time.perf_counter())

    for _ in range(args["iters"]):  # layer-wise
        receive()
    for _k, slots in args["variants"]:
        ch.set_staging_slots(slots)
        for _ in range(args["iters"]):
            receive()
    if args["profile"]:
        ch.set_staging_slots(args["variants"][0][1])
        with _profiled(args["profile"], "decode"):
            receive()
    stream_done = []
    for _k, slots, _pipelined in _stream_plan(args["variants"]):
        ch.set_staging_slots(slots)
        for _ in range(1 + args["stream"]):  # the first one untimed (new staging buffers)
            receive()
        stream_done.append(done[-1])
    raw = torch.empty(cfg.num_layers * 2 * n * pool[0, 0, 0].numel(), dtype=DTYPE, device=dev)
    raw_done: dict[int, list[float]] = {}
    for parts in args["raw_parts"]:
        for _ in range(args["iters"]):
            _raw_exchange(raw_pg, 1, raw, parts)
            raw_done.setdefault(parts, []).append(time.perf_counter())
    raw_stream_done = []
    for all_queued in (True, False):
        _raw_stream(raw_pg, 1, raw, args["stream"], all_queued)
        raw_stream_done.append(time.perf_counter())
    if args["profile"]:  # after every timed run: back to back, channel then raw
        ch.set_staging_slots(args["variants"][0][1])
        with _profiled(args["profile"], "decode_stream"):
            for _ in range(1 + args["stream"]):
                receive()
        with _profiled(args["profile"], "decode_raw_stream"):
            _raw_stream(raw_pg, 1, raw, args["stream"], True)
    ch.close()
    raw_pg.abort()
    results.put({"receiver_done": done, "receiver_header": header_in, "receiver_landed": landed,
                 "receiver_queued": queued, "raw_done": raw_done,
                 "stream_done": stream_done, "raw_stream_done": raw_stream_done,
                 "gc_decode": pauses.pauses})


@contextlib.contextmanager
def _profiled(out_dir: str, side: str) -> Iterator[None]:
    """A Chrome trace of one transfer (CPU and CUDA activity) in ``out_dir/{side}.json``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        yield
        torch.cuda.synchronize()
    os.makedirs(out_dir, exist_ok=True)
    prof.export_chrome_trace(os.path.join(out_dir, f"{side}.json"))


def _sender(args: dict[str, Any], ports: Any, results: Any) -> None:
    dev = torch.device("cuda:0")
    torch.cuda.set_device(dev)
    cfg = PRESETS[args["preset"]]
    n = blocks_for(args["prompt_len"], BLOCK)
    runner = ModelRunner(cfg, _cache(n + 8), ModelSpec("dummy", preset=args["preset"]),
                         RunnerConfig("cuda", DTYPE, "triton"), progress=False)
    port = ports.get(timeout=300)
    store = connect_store("127.0.0.1", port, 120.0)
    ch = open_sender(store=store, name="bench-kv", secret=Secret(args["secret"]),
                     spec=ChannelSpec.from_configs(cfg, _cache(n + 8)), device=dev,
                     timeout_s=120.0, owns_store=True)
    raw_pg = _raw_group(store, 0, dev)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(1000, cfg.vocab_size, (args["prompt_len"],), generator=gen).tolist()
    blocks = list(range(n))
    item = PrefillItem(prompt, 0, blocks)
    seq = PrefillSeq(PrefillTask("bench", tuple(prompt), 0, SamplingParams(temperature=0.0),
                                 Lease("decode", "bench", 1, 0, n, 60.0)), blocks, 0.0)
    lock = threading.Lock()

    def first_token(hook: Any = None) -> int:
        return int(runner.prefill([item], on_layer_done=hook).argmax(-1)[0])

    for _ in range(2):  # warm-up: Triton compilation, allocator
        first_token()
    pauses = _GcPauses()

    def start() -> float:
        """A timed send's start: the GPU idle and the receiver back at its doorbell, the
        sender's host idle (``--idle sleep``) or busy (``spin``, as a prefill worker's is)."""
        torch.cuda.synchronize(dev)
        if args["idle"] == "sleep":
            time.sleep(IDLE_S)
        else:
            until = time.perf_counter() + IDLE_S
            while time.perf_counter() < until:
                pass
        return time.perf_counter()

    alone, streamed_first = [], []
    layerwise_start: list[float] = []
    bulk_start: list[tuple[str, list[float], list[float]]] = []  # per variant
    raw_start: dict[int, list[float]] = {}
    for _ in range(args["iters"]):
        t0 = start()
        first_token()
        alone.append(time.perf_counter() - t0)
    for _ in range(args["iters"]):
        out = OutgoingKV(seq, ch, lock, runner.kv_pool, layerwise=True)
        layerwise_start.append(t0 := start())
        out.start()
        tok = first_token(out.send_layer)
        streamed_first.append(time.perf_counter() - t0)
        out.finish(tok)

    def outgoing(k: int) -> OutgoingKV:
        out = OutgoingKV(seq, ch, lock, runner.kv_pool, layerwise=False)
        if k:
            out.header = dataclasses.replace(out.header, layers_per_message=k)
        return out

    def send(out: OutgoingKV) -> float:
        """One whole transfer; returns when the doorbell had been rung."""
        out.start()
        rung = time.perf_counter()
        out.send_all_layers()
        out.finish(0)
        return rung

    for k, slots in args["variants"]:
        ch.set_staging_slots(slots)
        starts: list[float] = []
        rungs: list[float] = []
        for _ in range(args["iters"]):
            out = outgoing(k)
            starts.append(start())
            rungs.append(send(out))
        bulk_start.append((_variant(out.header.layers_per_message, slots), starts, rungs))
    if args["profile"]:
        k, slots = args["variants"][0]
        ch.set_staging_slots(slots)
        out = outgoing(k)
        start()
        with _profiled(args["profile"], "prefill"):
            send(out)
    # Sustained: transfers back to back, raw NCCL the same way below. Pipelined as the
    # prefill worker sends under load (each transfer departs once its trailer is posted and
    # the next one starts at once, queued behind), for each variant; then at the serving
    # default with each one's doorbell rung only once the previous transfer left.
    def send_stream(outs: list[OutgoingKV], pipelined: bool) -> float:
        """Transfers back to back; returns when the host had queued them all."""
        for out in outs:
            out.start()
            out.send_all_layers()
            out.finish(0, wait=not pipelined)
        posted = time.perf_counter()
        for out in outs if pipelined else []:
            out.wait_finished()
        return posted

    stream_start, stream_posted = [], []
    for k, slots, pipelined in _stream_plan(args["variants"]):
        ch.set_staging_slots(slots)
        send(outgoing(k))  # untimed: the staging buffers are allocated
        outs = [outgoing(k) for _ in range(args["stream"])]
        stream_start.append(start())
        stream_posted.append(send_stream(outs, pipelined))
    nbytes = out.nbytes
    raw = torch.empty(nbytes // 2, dtype=DTYPE, device=dev)
    for parts in args["raw_parts"]:
        for _ in range(args["iters"]):
            raw_start.setdefault(parts, []).append(start())
            _raw_exchange(raw_pg, 0, raw, parts)
    raw_stream_start = []
    for all_queued in (True, False):
        raw_stream_start.append(start())
        _raw_stream(raw_pg, 0, raw, args["stream"], all_queued)
    if args["profile"]:  # as the receiver: after every timed run
        k, slots = args["variants"][0]
        ch.set_staging_slots(slots)
        outs = [outgoing(k) for _ in range(1 + args["stream"])]
        start()
        with _profiled(args["profile"], "prefill_stream"):
            send_stream(outs, pipelined=True)
        start()
        with _profiled(args["profile"], "prefill_raw_stream"):
            _raw_stream(raw_pg, 0, raw, args["stream"], True)
    results.put({"alone_s": alone, "streamed_first_s": streamed_first,
                 "bulk_start": bulk_start, "layerwise_start": layerwise_start,
                 "raw_start": raw_start, "bytes": nbytes,
                 "stream_start": stream_start, "stream_posted": stream_posted,
                 "raw_stream_start": raw_stream_start, "gc_prefill": pauses.pauses,
                 "device": torch.cuda.get_device_name(dev)})
    ch.close()
    raw_pg.abort()


def _stream_plan(variants: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """Back-to-back runs: (layers per message, staging buffers, pipelined)."""
    return [(k, slots, True) for k, slots in variants] + [(0, STAGING_SLOTS, False)]


def _variant(k: int, slots: int) -> str:
    return f"{k} layers/message, {slots} staging buffers"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -P -m pdserve.cluster.bench.kv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS))
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--layers-per-message", type=_ints, default=[0], metavar="K,K,...",
                   help="channel variants: layers per message (0: the serving default)")
    p.add_argument("--staging-slots", type=_ints, default=[STAGING_SLOTS], metavar="S,S,...",
                   help="channel variants: staging buffers on each side")
    p.add_argument("--raw-parts", type=_ints, default=[1], metavar="P,P,...",
                   help="raw NCCL in P back-to-back messages (1: one message)")
    p.add_argument("--profile", metavar="DIR",
                   help="also trace one transfer of the first variant on each side "
                        "(torch.profiler Chrome traces DIR/prefill.json, DIR/decode.json) "
                        "and, after the timed runs, the same back to back, pipelined "
                        "(DIR/*_stream.json), and raw NCCL back to back, all queued "
                        "(DIR/*_raw_stream.json)")
    p.add_argument("--stream", type=int, default=8, metavar="T",
                   help="sustained bandwidth: T transfers back to back (serving default "
                        "message size), against T raw NCCL messages back to back")
    p.add_argument("--idle", choices=("sleep", "spin"), default="sleep",
                   help="how the sender waits before each timed send (channel and raw "
                        "alike): sleep (its CPU goes idle) or spin (a busy host)")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    if a.stream < 1:
        p.error("--stream must be at least 1")
    if torch.cuda.device_count() < 2:
        print("needs two GPUs", file=sys.stderr)
        return 2
    variants = [(k, slots) for k in a.layers_per_message for slots in a.staging_slots]
    args = {"preset": a.preset, "prompt_len": a.prompt_len, "iters": a.iters,
            "variants": variants, "raw_parts": a.raw_parts, "profile": a.profile,
            "stream": a.stream, "idle": a.idle, "secret": Secret.generate().key}
    ctx = mp.get_context("spawn")
    ports, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=f, args=(args, ports, results)) for f in (_receiver, _sender)]
    for proc in procs:
        proc.start()
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + 900
    while len(got) < len(procs):  # one result dict per process; give up once one died
        try:
            got.append(results.get(timeout=2))
        except queue.Empty:
            failed = [proc.exitcode for proc in procs if proc.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                for proc in procs:
                    proc.kill()
                print(f"bench_kv failed: exit codes {[p.exitcode for p in procs]}",
                      file=sys.stderr)
                return 1
    out = {k: v for part in got for k, v in part.items()}
    for proc in procs:
        proc.join(timeout=60)
    # Channel and raw NCCL alike: from the sender's start to the data verified (channel) or
    # received (raw) on the decode GPU; perf_counter is one system-wide monotonic clock.
    n = a.iters
    done, hdr, queued = out["receiver_done"], out["receiver_header"], out["receiver_queued"]
    landed = out["receiver_landed"]
    out["kv_ready_s"] = [  # first token -> every layer verified on the decode GPU
        d - s - f for s, d, f in zip(out["layerwise_start"], done[:n],
                                     out["streamed_first_s"], strict=True)]
    channel: dict[str, dict[str, float]] = {}
    for v, (name, starts, rungs) in enumerate(out["bulk_start"]):
        at = slice(n * (v + 1), n * (v + 2))
        med = statistics.median
        channel[name if name not in channel else f"{name} (#{v})"] = {
            "s": med([d - t for t, d in zip(starts, done[at], strict=True)]),
            # where the time goes: the sender rang the doorbell, the header came off it on
            # the decode side, recv_header returned (first receives posted), every
            # message's receive and unpack queued (host), verified and synchronized
            "rung_s": med([r - t for t, r in zip(starts, rungs, strict=True)]),
            "landed_s": med([h - t for t, h in zip(starts, landed[at], strict=True)]),
            "header_in_s": med([h - t for t, h in zip(starts, hdr[at], strict=True)]),
            "queued_s": med([q - t for t, q in zip(starts, queued[at], strict=True)]),
        }
    raw = {int(parts): statistics.median(
        [d - t for t, d in zip(out["raw_start"][parts], out["raw_done"][parts], strict=True)])
        for parts in out["raw_start"]}
    med_alone = statistics.median(out["alone_s"])
    med_streamed = statistics.median(out["streamed_first_s"])
    gb = out["bytes"] / 1e9
    raw_one = raw[min(raw)]
    default = next(iter(channel))
    report = {
        "device": out["device"], "preset": a.preset, "prompt_len": a.prompt_len,
        "kv_bytes": out["bytes"], "idle": a.idle,
        "prefill_alone_s": med_alone, "prefill_layerwise_s": med_streamed,
        "ttft_overhead": med_streamed / med_alone - 1,
        "kv_ready_after_first_token_s": statistics.median(out["kv_ready_s"]),
        "channel": {k: {**v, "gbps": gb / v["s"], "over_raw": raw_one / v["s"]}
                    for k, v in channel.items()},
        "raw_s": {str(k): v for k, v in raw.items()},
        "raw_nccl_gbps": gb / raw_one,
        "channel_over_raw": raw_one / channel[default]["s"],
        "stream_transfers": a.stream,
    }
    # Back to back: the channel pipelined (per variant) against raw messages all queued at
    # once (the ceiling); and each transfer (raw: message) waited for before the next.
    def rates(starts: list[float], ends: list[float]) -> list[float]:
        return [a.stream * gb / (d - t) for t, d in zip(starts, ends, strict=True)]

    *piped, waited = rates(out["stream_start"], out["stream_done"])
    raw_queued, raw_waited = rates(out["raw_stream_start"], out["raw_stream_done"])
    report["stream_channel_gbps"] = dict(zip(channel, piped, strict=True))
    # how long the sender's host took to queue them all, over how long they took to land
    shares = [(p - t) / (d - t) for t, p, d in zip(out["stream_start"], out["stream_posted"],
                                                   out["stream_done"], strict=True)]
    report["stream_posting_share"] = dict(zip(channel, shares[:-1], strict=True))
    report["stream_raw_gbps"] = raw_queued
    report["stream_channel_over_raw"] = piped[0] / raw_queued
    report["stream_waited_channel_gbps"], report["stream_waited_raw_gbps"] = waited, raw_waited
    report["stream_waited_over_raw"] = waited / raw_waited
    print(f"{a.preset}, {a.prompt_len}-token prompt, {out['bytes'] / 2**20:.0f} MiB of KV, "
          f"{out['device']} x2, sender {a.idle}s before each timed send")
    print(f"prefill alone (to first token)         {med_alone * 1e3:8.2f} ms")
    print(f"prefill + layer-wise send (to 1st tok) {med_streamed * 1e3:8.2f} ms"
          f"   overhead {report['ttft_overhead'] * 100:+.1f}%")
    print(f"KV verified on decode side after 1st   "
          f"{report['kv_ready_after_first_token_s'] * 1e3:8.2f} ms")
    print("channel, whole request (pack+checksum, send, receive, unpack+checksum, verify):")
    for name, v in report["channel"].items():
        print(f"  {name:38s} {v['s'] * 1e3:7.2f} ms {v['gbps']:6.1f} GB/s  "
              f"/raw {v['over_raw']:.2f}  (rung {v['rung_s'] * 1e3:.2f}, header landed "
              f"{v['landed_s'] * 1e3:.2f}, in {v['header_in_s'] * 1e3:.2f}, all queued "
              f"{v['queued_s'] * 1e3:.2f} ms)")
    for parts, t in raw.items():
        print(f"raw NCCL send/recv, same bytes, {parts:3d} msg  {t * 1e3:7.2f} ms "
              f"{gb / t:6.1f} GB/s")
    print(f"sustained, {a.stream} transfers back to back: raw NCCL, all queued "
          f"{raw_queued:6.1f} GB/s; the channel pipelined (serving):")
    for name, g in report["stream_channel_gbps"].items():
        print(f"  {name:38s} {g:6.1f} GB/s  /raw {g / raw_queued:.2f}  (sender's host "
              f"queued them all in {report['stream_posting_share'][name]:.0%} of the time)")
    print(f"  each waited: channel {report['stream_waited_channel_gbps']:6.1f} GB/s, raw NCCL "
          f"{report['stream_waited_raw_gbps']:6.1f} GB/s, ratio "
          f"{report['stream_waited_over_raw']:.2f}")
    for side in ("prefill", "decode"):
        collections: list[list[Any]] = out[f"gc_{side}"]
        longest = max(collections, key=lambda g: g[1], default=(0.0, 0.0, 0))
        report[f"gc_{side}"] = {"collections": len(collections), "longest_s": longest[1],
                                "longest_generation": longest[2]}
        print(f"garbage collections in the {side} process: {len(collections)}, longest "
              f"{longest[1] * 1e3:.1f} ms (generation {longest[2]})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"report": report, "raw": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
