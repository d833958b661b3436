"""The decode worker's step at one batch size, phase by phase, against the graph replay
alone measured in the same run.

    python -P -m pdserve.cluster.bench.worker_step [--preset llama-3.1-8b] [--batch 256] \
        [--context 768]

A step is what the worker's loop does between two reports: the scheduler (admission, block
growth), the forward pass and sampling (``decode_step``: a CUDA graph and a greedy argmax
read back to the host), the scheduler's postprocess and the step report, pickled as Ray
would send it. The sequences hold scattered blocks of an auto-sized pool (their KV is
whatever the pool holds: the kernels' work does not depend on it), sample greedily, as the
headline runs do, and never finish. Printed: each phase's median time per step and the
replay over the whole step (1.0: the host adds nothing to the GPU's time). With
``--device cpu`` (torch kernels, a small preset) only the host phases mean anything.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import statistics
import time

import torch

from pdserve.decode_worker.scheduler import DecodeScheduler
from pdserve.decode_worker.worker import decode_step
from pdserve.engine.config import PRESETS, CacheConfig, ModelSpec, RunnerConfig
from pdserve.engine.kv_cache import BlockAllocator
from pdserve.engine.messages import Reservation, StepReport
from pdserve.engine.runner import ModelRunner
from pdserve.engine.sequence import SamplingParams
from pdserve.kernels.timing import median_ms

PHASES = ("schedule", "forward + sample", "postprocess", "report")


def _scattered(allocator: BlockAllocator, seed: int = 0) -> None:
    """Shuffle the free list, as a pool looks after a while of serving."""
    ids = allocator.allocate(allocator.num_free)
    random.Random(seed).shuffle(ids)
    allocator.free(ids)


def bench_worker_step(runner: ModelRunner, batch: int, context: int, steps: int
                      ) -> dict[str, float]:
    """``steps`` worker steps of ``batch`` sequences that start at ``context`` tokens;
    returns each phase's median milliseconds, the step's and the graph replay's."""
    cfg = runner.config
    allocator = BlockAllocator(runner.num_blocks)
    _scattered(allocator)
    sched = DecodeScheduler(allocator, runner.block_size, "bench", max_num_seqs=batch,
                            lease_timeout_s=3600.0)
    greedy = SamplingParams(max_tokens=1 << 30, temperature=0.0, ignore_eos=True)
    rng = random.Random(0)
    for i in range(batch):
        lease = sched.reserve(Reservation(f"bench-{i:05d}", context - 1, 0, greedy, i))
        if lease is None:
            raise SystemExit(f"the pool ({runner.num_blocks} blocks) cannot hold {batch} "
                             f"sequences of {context + steps} tokens")
        sched.activate(lease.transfer_id, rng.randrange(cfg.vocab_size))
    times: dict[str, list[float]] = {p: [] for p in (*PHASES, "step")}
    for n in range(steps + 3):  # the first three: allocator and graph warm-up
        t0 = time.perf_counter()
        plan = sched.schedule()
        t1 = time.perf_counter()
        tokens = decode_step(runner, plan.batch)
        t2 = time.perf_counter()
        outs = sched.postprocess(plan.batch, tokens.tokens, tokens.logprobs)
        t3 = time.perf_counter()
        pickle.dumps(StepReport(
            worker="bench", tokens=outs, step_s=t3 - t0, num_running=len(sched.running),
            num_free_blocks=allocator.num_free, kv_usage=allocator.usage,
        ))
        t4 = time.perf_counter()
        if n >= 3:
            for p, dt in zip((*PHASES, "step"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0),
                             strict=True):
                times[p].append(dt * 1e3)
        if len(plan.batch) != batch:
            raise SystemExit(f"step {n} ran {len(plan.batch)} sequences, not {batch}")
    out = {f"{p}_ms": statistics.median(v) for p, v in times.items()}
    graphs = runner.graphs
    if graphs is not None:
        graph = graphs.graphs[graphs.size_for(batch)]
        out["replay_ms"] = median_ms(graph.replay, warmup=20, rep=300)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -P -m pdserve.cluster.bench.worker_step",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=768)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    on_cuda = args.device == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; use --device cpu (host phases only)")
    dtype = torch.bfloat16 if on_cuda else torch.float32
    cfg = PRESETS[args.preset]
    blocks = 0 if on_cuda else args.batch * (-(-(args.context + args.steps + 4) // 16))
    runner = ModelRunner(
        cfg, CacheConfig(16, blocks, dtype), ModelSpec("dummy", preset=args.preset),
        RunnerConfig(args.device, dtype, "triton" if on_cuda else "torch"), progress=False,
        max_num_seqs=args.batch,
    )
    runner.warmup()
    with torch.inference_mode():
        r = bench_worker_step(runner, args.batch, args.context, args.steps)
    device = torch.cuda.get_device_name() if on_cuda else "cpu"
    print(f"device: {device}, torch {torch.__version__}; {args.preset}, batch {args.batch}, "
          f"context {args.context} (+{args.steps} steps), {runner.num_blocks} KV blocks")
    for p in PHASES:
        print(f"  {p:<17} {r[f'{p}_ms']:8.3f} ms")
    print(f"  {'whole step':<17} {r['step_ms']:8.3f} ms")
    if "replay_ms" in r:
        print(f"  graph replay alone {r['replay_ms']:7.3f} ms -> replay / step = "
              f"{r['replay_ms'] / r['step_ms']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "preset": args.preset,
                       "batch": args.batch, "context": args.context, **r}, f, indent=1)


if __name__ == "__main__":
    main()
