"""One decode step of a dummy-weight model under CUDA graphs, against its memory roofline
measured in the same run (GPU only).

    python -P -m pdserve.cluster.bench.step [--preset llama-3.1-8b] [--batch 64] [--context 2048]

A decode step must read every weight once (the embedding only at the batch's rows) and every
sequence's cached K/V, so its floor is ``(weight bytes + KV bytes) / bandwidth``, with the
bandwidth of a device-to-device copy (bytes read + written) taken in the same process. The
figure is that floor over the graph replay's median time (1.0 = at the copy ceiling). The
KV pool is sized automatically (``num_blocks = 0``), the sequences' blocks are scattered over
it, and every sequence is at the full context.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from pdserve.engine.config import PRESETS, CacheConfig, ModelSpec, RunnerConfig
from pdserve.engine.kv_cache import kv_bytes_per_token
from pdserve.engine.runner import DecodeItem, ModelRunner
from pdserve.kernels.timing import copy_bandwidth, median_ms

WARMUP_MS, REP_MS = 50, 500  # do_bench's budget for each timed figure


def bench_step(preset: str, batch: int, context: int, copy_bw: float) -> dict[str, object]:
    """Build the runner, capture its graphs and time one decode step of ``batch`` sequences
    with ``context`` cached tokens each (the new token included)."""
    cfg = PRESETS[preset]
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    runner = ModelRunner(
        cfg, CacheConfig(16, 0, dtype), ModelSpec("dummy", preset=preset),
        RunnerConfig("cuda", dtype, "triton"), progress=False, max_num_seqs=batch,
    )
    load_s = time.perf_counter() - t0
    per_seq = -(-context // runner.block_size)
    if runner.num_blocks < batch * per_seq:
        raise SystemExit(f"the auto-sized pool holds {runner.num_blocks} blocks, the step needs "
                         f"{batch * per_seq}")
    t0 = time.perf_counter()
    runner.warmup()
    warmup_s = time.perf_counter() - t0
    graphs = runner.graphs
    assert graphs is not None
    rng = random.Random(0)
    blocks = rng.sample(range(runner.num_blocks), batch * per_seq)  # scattered, as in serving
    items = [DecodeItem(rng.randrange(cfg.vocab_size), context - 1,
                        blocks[i * per_seq : (i + 1) * per_seq]) for i in range(batch)]
    logits = runner.decode(items)
    assert logits.shape == (batch, cfg.vocab_size) and bool(torch.isfinite(logits).all())
    graph = graphs.graphs[graphs.size_for(batch)]
    replay_ms = median_ms(graph.replay, WARMUP_MS, REP_MS)
    # host input copies included
    step_ms = median_ms(lambda: runner.decode(items), WARMUP_MS, REP_MS)
    eager_ms = median_ms(lambda: runner.decode_eager(items), WARMUP_MS, REP_MS)

    seen: set[int] = set()
    weight_bytes = 0
    for name, w in runner.model.w.items():
        if w.data_ptr() in seen:
            continue
        seen.add(w.data_ptr())
        # the embedding table is gathered at the batch's rows, not read whole
        weight_bytes += batch * w.stride(0) * w.element_size() if name == "embed" else w.nbytes
    kv_bytes = batch * context * kv_bytes_per_token(cfg, dtype)
    floor_ms = (weight_bytes + kv_bytes) / copy_bw * 1e3
    return {
        "preset": preset, "batch": batch, "context": context, "dtype": "bfloat16",
        "num_blocks": runner.num_blocks, "kv_pool_gib": runner.kv_pool.nbytes / 2**30,
        "graph_sizes": graphs.sizes, "num_splits": graphs.num_splits[graphs.size_for(batch)],
        "load_s": load_s, "warmup_s": warmup_s,
        "weight_gb": weight_bytes / 1e9, "kv_gb": kv_bytes / 1e9, "copy_gbps": copy_bw / 1e9,
        "replay_ms": replay_ms, "step_ms": step_ms, "eager_ms": eager_ms,
        "roofline_ms": floor_ms, "ratio": floor_ms / replay_ms,
        "ratio_with_host": floor_ms / step_ms,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -P -m pdserve.cluster.bench.step",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the step benchmark needs a CUDA GPU")
    copy_bw = copy_bandwidth()  # before the model: its 2 GiB are freed for the KV pool
    torch.cuda.empty_cache()
    r = bench_step(args.preset, args.batch, args.context, copy_bw)
    device = torch.cuda.get_device_name()
    print(f"device: {device}, torch {torch.__version__}")
    print(f"{r['preset']} bf16 decode step, B={r['batch']} context={r['context']}: "
          f"{r['num_blocks']} KV blocks auto-sized ({r['kv_pool_gib']:.1f} GiB), graphs "
          f"{r['graph_sizes']}, {r['num_splits']} split(s); load {r['load_s']:.1f} s, "
          f"warmup + capture {r['warmup_s']:.1f} s")
    print(f"  bytes per step: weights {r['weight_gb']:.2f} GB + KV {r['kv_gb']:.2f} GB; "
          f"copy bandwidth {r['copy_gbps']:.0f} GB/s -> roofline {r['roofline_ms']:.3f} ms")
    print(f"  graph replay {r['replay_ms']:.3f} ms (median) -> roofline / replay = "
          f"{r['ratio']:.3f}")
    print(f"  decode() with host inputs {r['step_ms']:.3f} ms -> {r['ratio_with_host']:.3f}; "
          f"eager decode {r['eager_ms']:.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, **r}, f, indent=1)


if __name__ == "__main__":
    main()
