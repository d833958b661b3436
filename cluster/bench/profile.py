"""``pdserve profile``: measure the cost model's fits on the serving device and write them
as a JSON :class:`~pdserve.router.cost_model.Profile`.

It builds a decode worker's model runner from the serve settings (the same ``WorkerConfig``,
so the same pool, dtype, backend, CPU threads and CUDA graphs) and times, as wall seconds
of the forward pass plus sampling (what the workers report), the median of a few runs after
one warm-up run each:

- prefill steps: single prompts from 16 tokens up to ``max_batch_tokens`` (a geometric
  grid), chunks after a cached prefix (as a long prompt's later chunks), batches of several
  prompts, and a chunk with new prompts beside it;
- decode steps: batch 1, 2, 4, ... up to ``max_num_seqs``, each at per-sequence contexts
  from 16 tokens up to what the pool (and the model's context) holds, through the runner's
  serving path (CUDA graphs where they are captured);
- KV transfers through the real channel (``transfer_profile``), or a prior.

Then it fits them (``router.fitting``), prints each fit with its median relative error over
its samples, and writes the JSON.
"""

from __future__ import annotations

import datetime
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.cluster.bench.transfer_profile import (
    measure_transfers,
    prior_samples,
    transfer_sizes,
)
from pdserve.cluster.config import ServeConfig
from pdserve.engine.chunking import attention_work
from pdserve.engine.config import blocks_for
from pdserve.engine.kv import ChannelSpec
from pdserve.engine.kv_cache import BlockAllocator, kv_bytes_per_token
from pdserve.engine.runner import DecodeItem, ModelRunner, PrefillItem
from pdserve.engine.sampler import sample
from pdserve.engine.sequence import SamplingParams
from pdserve.engine.warmup import start_runner, warm_up
from pdserve.router.cost_model import (
    Profile,
    TransferFit,
    fit_linear,
    fit_transfer,
    median_relative_error,
    profile_filename,
)

MIN_PROMPT = 16  # the smallest prompt measured (and the smallest context)
LONG_STEP_S = 1.0  # a step this long is timed once after its warm-up run
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)

Chunks = list[tuple[int, int]]  # one prefill step: (start, length) per sequence


@dataclass(frozen=True)
class ProfileOptions:
    """What ``pdserve profile`` adds to the serve settings."""

    out: str | None = None  # default: ./<device>-<model>.json
    quick: bool = False  # a few points only (tests, a first look)
    transfer: bool = True  # False: the transfer prior, no channel
    command: str = ""  # the command line, kept in the JSON


def geometric(lo: int, hi: int, factor: int) -> list[int]:
    """lo, lo·factor, ... below ``hi``, then ``hi`` (nothing if hi < lo)."""
    out, n = [], lo
    while n < hi:
        out.append(n)
        n *= factor
    return [*out, hi] if hi >= lo else out


def prefill_plan(max_batch_tokens: int, max_num_seqs: int, max_context: int,
                 num_blocks: int, block_size: int, quick: bool) -> list[Chunks]:
    """The prefill steps to time: single prompts, chunks after a cached prefix, batches;
    each within the token budget, the context and the pool."""
    b = max_batch_tokens
    steps: list[Chunks] = [[(0, n)] for n in geometric(MIN_PROMPT, b, 4 if quick else 2)]
    for start in (b // 2,) if quick else (b // 2, 2 * b):
        for n in (b // 4,) if quick else (b // 4, b // 2):
            if n >= MIN_PROMPT and start + n <= max_context:
                steps.append([(start, n)])
    for width in (4,) if quick else (4, 32):
        k = min(width, max_num_seqs)
        if k > 1 and b // k >= MIN_PROMPT:
            steps.append([(0, b // k)] * k)
    if not quick and max_num_seqs >= 5 and b // 8 >= MIN_PROMPT and b + b // 2 <= max_context:
        steps.append([(b, b // 2)] + [(0, b // 8)] * 4)  # a long prompt's chunk + new ones
    fits = [s for s in steps if sum(blocks_for(st + n, block_size) for st, n in s) <= num_blocks]
    return list({tuple(s): s for s in fits}.values())  # each step once


def decode_plan(max_num_seqs: int, max_context: int, num_blocks: int, block_size: int,
                quick: bool) -> list[tuple[int, int]]:
    """(batch, per-sequence context) pairs to time: batches 1, 2, 4, ... ``max_num_seqs``,
    contexts x4 from 16 up to what the pool holds for the batch."""
    out = []
    for batch in geometric(1, max_num_seqs, 4 if quick else 2):
        cap = min(max_context, num_blocks // batch * block_size)
        out += [(batch, ctx) for ctx in geometric(MIN_PROMPT, cap, 16 if quick else 4)]
    return out


def _median_s(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """Median wall seconds of ``fn`` over ``reps`` runs after one warm-up run; a single run
    after a warm-up of over ``LONG_STEP_S`` (such steps vary by a few percent, and on a
    CPU they are most of the profile's time)."""
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    first = run()
    return statistics.median(run() for _ in range(1 if first > LONG_STEP_S else reps))


class _Timer:
    """Times prefill and decode steps on the runner, each sequence on scattered blocks."""

    def __init__(self, runner: ModelRunner, allocator: BlockAllocator, reps: int) -> None:
        self.runner = runner
        self.allocator = allocator
        self.reps = reps
        self.rng = random.Random(0)
        ids = allocator.allocate(allocator.num_free)  # scattered, as after a while of serving
        self.rng.shuffle(ids)
        allocator.free(ids)

    def _blocks(self, num_tokens: int) -> list[int]:
        return self.allocator.allocate(blocks_for(num_tokens, self.runner.block_size))

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(3, self.runner.config.vocab_size) for _ in range(n)]

    def prefill(self, chunks: Chunks) -> float:
        held = [self._blocks(start + n) for start, n in chunks]
        items = [PrefillItem(self._tokens(n), start, blocks)
                 for (start, n), blocks in zip(chunks, held, strict=True)]
        try:
            return _median_s(lambda: sample(self.runner.prefill(items), [GREEDY] * len(items),
                                            [0] * len(items)), self.reps, self.runner.device)
        finally:
            for blocks in held:
                self.allocator.free(blocks)

    def decode(self, batch: int, context: int) -> float:
        held = [self._blocks(context) for _ in range(batch)]
        items = [DecodeItem(tok, context - 1, blocks)
                 for tok, blocks in zip(self._tokens(batch), held, strict=True)]
        try:
            return _median_s(lambda: sample(self.runner.decode(items), [GREEDY] * batch,
                                            [0] * batch), self.reps, self.runner.device)
        finally:
            for blocks in held:
                self.allocator.free(blocks)


def run_profile(cfg: ServeConfig, opts: ProfileOptions) -> Profile:
    """Measure, fit, print and write the profile of ``cfg``'s model on its device."""
    t_start = time.perf_counter()
    wcfg = cfg.worker_config("decode", os.cpu_count() or 1)
    model_config, runner, allocator = start_runner(wcfg)
    warm_up(runner, allocator, wcfg.max_num_seqs, prefill=True, decode=True)
    dev = runner.device
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    dtype = str(wcfg.run.dtype).removeprefix("torch.")
    max_context = min(cfg.max_context or model_config.max_position, model_config.max_position)
    bs, mbt = runner.block_size, wcfg.max_batch_tokens
    cuda = dev.type == "cuda"
    reps = (3 if opts.quick else 10) if cuda else (2 if opts.quick else 3)
    print(f"pdserve profile: {model_config.name} on {device}, {dtype}, {wcfg.run.backend} "
          f"kernels, {torch.get_num_threads()} CPU thread(s), pool {runner.num_blocks} "
          f"blocks of {bs}", file=sys.stderr)

    timer = _Timer(runner, allocator, reps)
    prefill_rows = []
    with torch.inference_mode():
        for chunks in prefill_plan(mbt, wcfg.max_num_seqs, max_context, runner.num_blocks, bs,
                                   opts.quick):
            prefill_rows.append([float(sum(n for _, n in chunks)),
                                 float(attention_work(chunks)), timer.prefill(chunks)])
        decode_rows = [[float(b), float(b * ctx), timer.decode(b, ctx)]
                       for b, ctx in decode_plan(wcfg.max_num_seqs, max_context,
                                                 runner.num_blocks, bs, opts.quick)]
    spec = ChannelSpec.from_configs(model_config, runner.cache_config)
    if opts.transfer:
        sizes = transfer_sizes(min(max_context, runner.num_blocks * bs, 2 * mbt), bs,
                               opts.quick)
        transfer = measure_transfers(spec, runner.kv_pool, sizes, reps)
    else:
        transfer = prior_samples(dev, "--no-transfer")
    transfer_fit = (TransferFit(*transfer.prior) if transfer.prior
                    else fit_transfer(transfer.rows))

    profile = Profile(
        device=device, model=model_config.name, dtype=dtype, block_size=bs,
        max_batch_tokens=mbt,
        kv_bytes_per_token=kv_bytes_per_token(model_config, runner.cache_config.dtype),
        prefill=fit_linear(prefill_rows), decode=fit_linear(decode_rows),
        transfer=transfer_fit,
        samples={"prefill": prefill_rows, "decode": decode_rows, "transfer": transfer.rows},
        created=datetime.date.today().isoformat(), command=opts.command,
        notes={
            "timing": f"wall seconds of the forward pass and sampling, median of {reps} "
                      "runs after one warm-up run",
            "transfer": transfer.note, "backend": wcfg.run.backend,
            "threads": str(torch.get_num_threads()), "torch": torch.__version__,
            "kv_pool_blocks": str(runner.num_blocks),
            "max_num_seqs": str(wcfg.max_num_seqs),
        },
    )
    out = Path(opts.out or profile_filename(device, model_config.name))
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(out)
    for line in describe(profile):
        print(line)
    print(f"measured in {time.perf_counter() - t_start:.0f} s; wrote {out.resolve()}")
    return profile


def describe(p: Profile) -> list[str]:
    """Each fit, with its median relative error over its samples."""
    def quality(kind: str, predict: Callable[..., float]) -> str:
        rows = p.samples.get(kind, [])
        if not rows:
            return "no samples"
        return f"{len(rows)} samples, median error {median_relative_error(predict, rows):.1%}"

    f, d, t = p.prefill, p.decode, p.transfer
    return [
        f"prefill  s = {f.a * 1e3:.3f} ms + {f.b * 1e6:.3f} us * tokens + "
        f"{f.c * 1e9:.4f} ns * attention   ({quality('prefill', f)})",
        f"decode   s = {d.a * 1e3:.3f} ms + {d.b * 1e6:.3f} us * batch + "
        f"{d.c * 1e9:.4f} ns * context   ({quality('decode', d)})",
        f"transfer s = {t.latency_s * 1e3:.3f} ms + bytes / {t.bytes_per_s / 1e9:.3f} GB/s   "
        f"({quality('transfer', t)}; {p.notes.get('transfer', '')})",
    ]
