"""KV transfer on two GPUs: layer-wise streaming against prefill alone, and channel
bandwidth against raw NCCL send/recv of the same bytes over the same process group.

    python -m cluster.bench_kv --preset llama-3.1-8b --prompt-len 4096 --json out.json

Two processes (prefill on cuda:0, decode on cuda:1), the real ``KVChannel`` and the real
prefill path (``OutgoingKV`` hooked into the forward pass). Printed, all from one run:
- TTFT overhead: (prefill with layer-wise sending, to first token) / (prefill alone) - 1;
- time from the first token until the decode side has every layer unpacked and verified;
- channel bandwidth of a whole request's KV (pack + checksum, send in messages of several
  layers, receive, unpack + checksum, verify: from the sender's start until the decode side
  verified it) over raw NCCL send/recv of the same bytes in one message, timed the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from typing import Any

import torch
import torch.multiprocessing as mp

from engine.config import PRESETS, CacheConfig, ModelSpec, RunnerConfig, blocks_for
from engine.kv_cache import allocate_kv_pool
from engine.kv_transfer import ChannelSpec, KVChannel
from engine.messages import Lease, PrefillTask
from engine.runner import ModelRunner, PrefillItem
from engine.sequence import SamplingParams
from prefill_worker.kv_sender import OutgoingKV
from prefill_worker.scheduler import PrefillSeq

BLOCK = 16
DTYPE = torch.bfloat16


def _cache(n_blocks: int) -> CacheConfig:
    return CacheConfig(BLOCK, n_blocks, DTYPE)


def _receiver(args: dict[str, Any], ports: Any, results: Any) -> None:
    dev = torch.device("cuda:1")
    torch.cuda.set_device(dev)
    cfg = PRESETS[args["preset"]]
    n = blocks_for(args["prompt_len"], BLOCK)
    pool = allocate_kv_pool(cfg, _cache(n + 8), dev)
    store, port = KVChannel.host_store("127.0.0.1", 0, 120.0)
    ports.put(port)
    ch = KVChannel.open(store=store, name="bench-kv", rank=1,
                        spec=ChannelSpec.from_configs(cfg, _cache(n + 8)), device=dev,
                        timeout_s=120.0, owns_store=True)
    ids = torch.arange(n, dtype=torch.int64, device=dev)
    done = []
    for _ in range(args["transfers"]):
        h = ch.recv_header(timeout_s=300.0)
        ch.recv_pool_blocks(h, pool, ids)
        torch.cuda.synchronize(dev)
        done.append(time.perf_counter())
    raw = torch.empty(cfg.num_layers * 2 * n * pool[0, 0, 0].numel(), dtype=DTYPE, device=dev)
    raw_done = []
    for _ in range(args["iters"]):
        ch.raw_exchange(raw)
        raw_done.append(time.perf_counter())
    results.put({"receiver_done": done, "raw_done": raw_done})
    ch.close()


def _sender(args: dict[str, Any], ports: Any, results: Any) -> None:
    dev = torch.device("cuda:0")
    torch.cuda.set_device(dev)
    cfg = PRESETS[args["preset"]]
    n = blocks_for(args["prompt_len"], BLOCK)
    runner = ModelRunner(cfg, _cache(n + 8), ModelSpec("dummy", preset=args["preset"]),
                         RunnerConfig("cuda", DTYPE, "triton"), progress=False)
    port = ports.get(timeout=300)
    ch = KVChannel.open(store=KVChannel.connect_store("127.0.0.1", port, 120.0),
                        name="bench-kv", rank=0,
                        spec=ChannelSpec.from_configs(cfg, _cache(n + 8)), device=dev,
                        timeout_s=120.0, owns_store=True)
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

    def start() -> float:
        """A timed send's start: the GPU idle and the receiver back at its doorbell."""
        torch.cuda.synchronize(dev)
        time.sleep(0.05)
        return time.perf_counter()

    alone, streamed_first = [], []
    layerwise_start, bulk_start, raw_start = [], [], []
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
    for _ in range(args["iters"]):
        out = OutgoingKV(seq, ch, lock, runner.kv_pool, layerwise=False)
        bulk_start.append(start())
        out.start()
        out.send_all_layers()
        out.finish(0)
    nbytes, per_message = out.nbytes, out.header.layers_per_message
    raw = torch.empty(nbytes // 2, dtype=DTYPE, device=dev)
    for _ in range(args["iters"]):
        raw_start.append(start())
        ch.raw_exchange(raw)
    results.put({"alone_s": alone, "streamed_first_s": streamed_first,
                 "bulk_start": bulk_start, "layerwise_start": layerwise_start,
                 "raw_start": raw_start, "bytes": nbytes, "layers_per_message": per_message,
                 "device": torch.cuda.get_device_name(dev)})
    ch.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.bench_kv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS))
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    if torch.cuda.device_count() < 2:
        print("needs two GPUs", file=sys.stderr)
        return 2
    args = {"preset": a.preset, "prompt_len": a.prompt_len, "iters": a.iters,
            "transfers": 2 * a.iters}
    ctx = mp.get_context("spawn")
    ports, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=f, args=(args, ports, results)) for f in (_receiver, _sender)]
    for proc in procs:
        proc.start()
    out: dict[str, Any] = {}
    for _ in procs:
        out.update(results.get(timeout=900))
    for proc in procs:
        proc.join(timeout=60)
    # Channel and raw NCCL alike: from the sender's start to the data verified (channel) or
    # received (raw) on the decode GPU; perf_counter is one system-wide monotonic clock.
    bulk_done = out["receiver_done"][a.iters:]
    out["kv_ready_s"] = [  # first token -> every layer verified on the decode GPU
        d - s - f for s, d, f in zip(out["layerwise_start"], out["receiver_done"][:a.iters],
                                     out["streamed_first_s"], strict=True)]
    out["bulk_s"] = [d - s for s, d in zip(out["bulk_start"], bulk_done, strict=True)]
    out["raw_s"] = [d - s for s, d in zip(out["raw_start"], out["raw_done"], strict=True)]
    med = {k: statistics.median(v) for k, v in out.items()
           if isinstance(v, list) and k.endswith("_s")}
    gbs = out["bytes"] / 1e9
    report = {
        "device": out["device"], "preset": a.preset, "prompt_len": a.prompt_len,
        "kv_bytes": out["bytes"], "median_s": med,
        "ttft_overhead": med["streamed_first_s"] / med["alone_s"] - 1,
        "kv_ready_after_first_token_s": med["kv_ready_s"],
        "channel_gbps": gbs / med["bulk_s"], "raw_nccl_gbps": gbs / med["raw_s"],
        "channel_over_raw": med["raw_s"] / med["bulk_s"],
        "layers_per_message": out["layers_per_message"],
    }
    print(f"{a.preset}, {a.prompt_len}-token prompt, {out['bytes'] / 2**20:.0f} MiB of KV, "
          f"{out['device']} x2")
    print(f"prefill alone (to first token)         {med['alone_s'] * 1e3:8.2f} ms")
    print(f"prefill + layer-wise send (to 1st tok) {med['streamed_first_s'] * 1e3:8.2f} ms"
          f"   overhead {report['ttft_overhead'] * 100:+.1f}%")
    print(f"KV verified on decode side after 1st   "
          f"{report['kv_ready_after_first_token_s'] * 1e3:8.2f} ms")
    print(f"channel transfer, {out['layers_per_message']} layers/message  "
          f"{med['bulk_s'] * 1e3:8.2f} ms {report['channel_gbps']:7.1f} GB/s "
          f"(pack+checksum, send, receive, unpack+checksum, verify)")
    print(f"raw NCCL send/recv, same bytes         {med['raw_s'] * 1e3:8.2f} ms "
          f"{report['raw_nccl_gbps']:7.1f} GB/s   ratio {report['channel_over_raw']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"report": report, "raw": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
