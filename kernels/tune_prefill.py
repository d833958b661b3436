"""Sweep the prefill attention kernel's tiles and switches against torch SDPA (GPU only).

    python -P -m pdserve.kernels.tune_prefill [--seq 1024,4096,16384] [--tokens 16384] [--jobs N]
                                   [--top N] [--json PATH]

The case is kernels/bench.py's prefill row (bf16, 32 q / 8 kv heads, head dim 128, 16-token
pages, ``tokens // seq`` sequences of ``seq`` tokens, scattered blocks); SDPA is timed by
that very function, once per length. Every candidate, a tile shape (block_m, block_n, warps,
stages) x the launcher's switches (``heavy_first``, ``scale_mode``, ``page_ids``,
``prefetch_ids``: see kernels/attention_prefill.py; :func:`candidates` says which
combinations), is timed the same way (``do_bench`` median)
and its output compared with the default configuration's (max abs difference; ``BAD`` past
``8x`` the default's own error against the float32 reference, or non-finite). Candidates that
fail to compile or to launch (shared memory) are listed and skipped.

The kernels are compiled first by ``--jobs`` worker processes, which fill Triton's on-disk
cache; the timing then runs in this process (compiling there whatever a worker did not).
Prints, per length, the candidates sorted by time ratio SDPA / ours and the best one.
The default sweep is 210 (length, candidate) pairs: about 2 minutes on an H100 host with
16 cores and a cold Triton cache (1-2 s to compile each kernel, 0.25 s to time each pair).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import product
from multiprocessing import get_context

import torch

from pdserve.kernels.bench import BLOCK, DTYPE, HEAD_DIM, HK, HQ, _prefill_case
from pdserve.kernels.timing import median_ms

# (block_m, block_n, warps, stages, lengths tried at: (lo, hi) inclusive). Pruned with ptxas's
# reports of the sm_90a builds (d128, group 4): 128x64 tiles with 4 warps, 256-row tiles with
# 8 warps and 128x128 with 4 warps spill registers, 256x128 with 16 warps spills kilobytes;
# 32-key tiles and 64x64 only where keys are few.
TILES = [
    (64, 64, 4, 3, (0, 2048)),
    (64, 64, 4, 4, (0, 2048)),
    (64, 128, 4, 3, (0, 1 << 30)),
    (128, 32, 4, 3, (0, 2048)),
    (128, 32, 4, 4, (0, 2048)),
    (128, 64, 8, 3, (0, 1 << 30)),
    (128, 64, 8, 4, (0, 1 << 30)),
    (128, 128, 8, 2, (0, 1 << 30)),
    (128, 128, 8, 3, (0, 1 << 30)),
    (256, 64, 16, 3, (2048, 1 << 30)),
]
SMEM_BYTES = 227 * 1024
DEVICE = "cuda"
BAD_FACTOR = 8.0  # a candidate differing from the default by 8x the default's own error


@dataclass(frozen=True)
class Candidate:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    heavy_first: bool
    scale_mode: str
    page_ids: bool
    prefetch_ids: bool

    def label(self) -> str:
        return (f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages} "
                f"{'heavy' if self.heavy_first else 'light'} {self.scale_mode} "
                f"{'page_ids' if self.page_ids else 'key_ids'}"
                f"{'' if self.prefetch_ids else ' no_prefetch'}")


SWITCHES = ("heavy_first", "scale_mode", "page_ids", "prefetch_ids")


def _launcher_defaults() -> tuple[bool, str, bool, bool]:
    from pdserve.kernels.attention_prefill import prefill_attention

    params = inspect.signature(prefill_attention).parameters
    heavy, scale, pages, prefetch = (params[name].default for name in SWITCHES)
    return heavy, scale, pages, prefetch


def default_candidate(seq: int) -> Candidate:
    """What the launcher picks by itself for this case."""
    from pdserve.kernels.attention_prefill import _default_tiles

    return Candidate(*_default_tiles(HEAD_DIM, seq), *_launcher_defaults())


def candidates(seq: int) -> list[Candidate]:
    """Per tile: every combination of heavy_first x scale_mode "fma"/"q" x page_ids, with the
    ids prefetched; and two references, the launcher's defaults but for scale_mode "tile"
    (the same kernel plus one FMUL per score) or without the prefetch (the old pipeline).
    Also the launcher's own default, if not among them."""
    out = []
    heavy0, _, pages0, _ = _launcher_defaults()
    for bm, bn, warps, stages, (lo, hi) in TILES:
        smem = DTYPE.itemsize * HEAD_DIM * (bm + 2 * stages * bn)  # q + stages x (K, V)
        if not lo <= seq <= hi or smem > SMEM_BYTES:
            continue
        tile = (bm, bn, warps, stages)
        for heavy, mode, pages in product((True, False), ("fma", "q"), (False, True)):
            out.append(Candidate(*tile, heavy, mode, pages, True))
        out.append(Candidate(*tile, heavy0, "tile", pages0, True))
        out.append(Candidate(*tile, heavy0, "fma", pages0, False))
    default = default_candidate(seq)
    if default not in out:
        out.append(default)
    return out


@dataclass
class Case:
    """kernels/bench.py's prefill inputs (its ``_prefill_case`` builds the same, privately)."""

    seq: int
    batch: int
    q: torch.Tensor
    pool: torch.Tensor
    tables: torch.Tensor
    cu: torch.Tensor
    lens: torch.Tensor

    @classmethod
    def build(cls, seq: int, tokens: int) -> Case:
        torch.manual_seed(seq)
        batch = max(1, tokens // seq)
        blocks_per_seq = seq // BLOCK
        num_blocks = batch * blocks_per_seq
        pool = torch.randn(2, num_blocks, BLOCK, HK, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        perm = torch.randperm(num_blocks, device=DEVICE).to(torch.int32)
        return cls(
            seq=seq, batch=batch,
            q=torch.randn(batch * seq, HQ, HEAD_DIM, device=DEVICE, dtype=DTYPE),
            pool=pool, tables=perm.view(batch, blocks_per_seq),
            cu=torch.arange(0, batch + 1, device=DEVICE, dtype=torch.int32) * seq,
            lens=torch.full((batch,), seq, dtype=torch.int32, device=DEVICE),
        )

    def args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor, torch.Tensor, int, float]:
        return (self.q, self.pool[0], self.pool[1], self.cu, self.lens, self.tables, self.seq,
                HEAD_DIM**-0.5)

    def fn(self, c: Candidate) -> Callable[[], torch.Tensor]:
        from pdserve.kernels.attention_prefill import prefill_attention

        args = self.args()
        return lambda: prefill_attention(
            *args, block_m=c.block_m, block_n=c.block_n, num_warps=c.num_warps,
            num_stages=c.num_stages, heavy_first=c.heavy_first, scale_mode=c.scale_mode,
            page_ids=c.page_ids, prefetch_ids=c.prefetch_ids,
        )

    def flops(self) -> float:
        return case_flops(self.seq, self.batch * self.seq)

    def ref_error(self, out: torch.Tensor, chunk: int = 1024) -> float:
        """Max abs error of ``out`` against the float32 reference. The reference runs
        ``chunk`` queries at a time as a chunk after a cached prefix (its math path would
        need an [Hq, L, L] score matrix for a whole sequence: 32 GiB at 16k)."""
        from pdserve.kernels.attention_prefill import prefill_attention_ref

        err = 0.0
        for b in range(self.batch):
            for j in range(0, self.seq, chunk):
                n = min(chunk, self.seq - j)
                rows = slice(b * self.seq + j, b * self.seq + j + n)
                cu = torch.tensor([0, n], dtype=torch.int32, device=DEVICE)
                lens = torch.tensor([j + n], dtype=torch.int32, device=DEVICE)
                ref = prefill_attention_ref(self.q[rows], self.pool[0], self.pool[1], cu, lens,
                                            self.tables[b : b + 1], n, HEAD_DIM**-0.5)
                err = max(err, float((out[rows].float() - ref.float()).abs().max()))
        return err


_WORKER_CASES: dict[int, Case] = {}


def _error(exc: Exception) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"[:160]


def _precompile(seq: int, tokens: int, c: Candidate) -> str:
    """In a worker process: compile (into Triton's disk cache) and run once; '' or the error."""
    try:
        if seq not in _WORKER_CASES:
            _WORKER_CASES[seq] = Case.build(seq, tokens)
        _WORKER_CASES[seq].fn(c)()
        torch.cuda.synchronize()
    except Exception as exc:  # compile errors, out of shared memory: reported, not fatal
        return _error(exc)
    return ""


def precompile(work: list[tuple[int, Candidate]], tokens: int, jobs: int) -> None:
    """Compile ``work`` in ``jobs`` processes into Triton's disk cache. Only a cache warmer:
    the timing loop compiles (or fails) again whatever a worker could not."""
    if jobs <= 0:
        return
    start = time.perf_counter()
    failed = 0
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_precompile, seq, tokens, c) for seq, c in work]
        for i, fut in enumerate(futures):
            try:
                failed += bool(fut.result())
            except Exception as exc:  # a worker died (a compiler crash): the pool is broken
                print(f"precompile stopped: {_error(exc)}", file=sys.stderr)
                break
            if (i + 1) % 50 == 0:
                print(f"precompiled {i + 1}/{len(work)} ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr)
    print(f"precompiled {len(work)} kernels ({failed} failed) in "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)


@dataclass
class Result:
    config: Candidate
    ms: float | None = None
    tflops: float | None = None
    ratio: float | None = None  # SDPA time / ours
    max_diff: float | None = None  # vs the default configuration's output
    bad: bool = False
    error: str = ""


def tune_seq(seq: int, tokens: int) -> dict:
    """Time every candidate at one length; the results as a JSON-ready dict."""
    # SDPA (and the default config) exactly as kernels/bench.py measures them.
    row = _prefill_case(seq, tokens)
    sdpa_ms = row.ms * row.ratio  # ratio = ours' TFLOP/s over SDPA's = SDPA time / ours
    torch.cuda.empty_cache()

    case = Case.build(seq, tokens)
    default = default_candidate(seq)
    out_default = case.fn(default)().float()
    default_err = case.ref_error(out_default)
    limit = max(BAD_FACTOR * default_err, 1e-3)

    results = []
    cands = candidates(seq)
    for i, c in enumerate(cands):
        if i and i % 25 == 0:
            print(f"L={seq}: {i}/{len(cands)}", file=sys.stderr)
        res = Result(c)
        results.append(res)
        try:
            fn = case.fn(c)
            out = fn().float()
            torch.cuda.synchronize()
            res.max_diff = float((out - out_default).abs().max())
            res.bad = not (bool(out.isfinite().all()) and res.max_diff <= limit)
            del out
            res.ms = median_ms(fn)
        except Exception as exc:  # out of resources at launch, compile errors
            res.error = _error(exc)
            continue
        res.tflops = case.flops() / (res.ms * 1e-3) / 1e12
        res.ratio = sdpa_ms / res.ms
    del case
    torch.cuda.empty_cache()

    ok = sorted((r for r in results if r.ms is not None and not r.bad),
                key=lambda r: -(r.ratio or 0.0))
    default_res = next(r for r in results if r.config == default)
    return {
        "seq": seq,
        "batch": max(1, tokens // seq),
        "sdpa_ms": sdpa_ms,
        "sdpa_tflops": case_flops(seq, tokens) / (sdpa_ms * 1e-3) / 1e12,
        "bench_default_ratio": row.ratio,
        "default_err_vs_ref": default_err,
        "bad_limit": limit,
        "default": asdict(default_res),
        "best": asdict(ok[0]) if ok else None,
        "rows": [asdict(r) for r in sorted(results, key=lambda r: -(r.ratio or -1.0))],
    }


def case_flops(seq: int, tokens: int) -> float:
    """kernels/bench.py's count: causal, half of QK^T and PV."""
    return 4 * max(1, tokens // seq) * HQ * HEAD_DIM * seq * seq / 2


def _fmt(r: dict) -> str:
    c = Candidate(**r["config"])
    if r["error"]:
        return f"{'-':>6} {'-':>8} {'-':>8} {'-':>9}  {c.label():<46} {r['error'][:60]}"
    flag = "BAD" if r["bad"] else ""
    return (f"{r['ratio']:>6.3f} {r['tflops']:>8.1f} {r['ms']:>8.3f} {r['max_diff']:>9.2e}  "
            f"{c.label():<46} {flag}")


def report(seq_res: dict, top: int) -> None:
    s = seq_res
    print(f"\nL={s['seq']} B={s['batch']}: SDPA {s['sdpa_ms']:.3f} ms "
          f"({s['sdpa_tflops']:.0f} TFLOP/s); kernels.bench default ratio "
          f"{s['bench_default_ratio']:.3f}; default max err vs fp32 ref "
          f"{s['default_err_vs_ref']:.2e} (BAD past {s['bad_limit']:.2e})")
    header = f"{'ratio':>6} {'TFLOP/s':>8} {'ms':>8} {'maxdiff':>9}  config"
    print(header)
    print("-" * 72)
    rows = s["rows"]
    timed = [r for r in rows if not r["error"]]
    shown = timed[:top] if top else timed
    for r in shown:
        print(_fmt(r))
    if len(timed) > len(shown):
        print(f"... {len(timed) - len(shown)} more in the JSON")
    for r in rows:
        if r["error"] or (r["bad"] and r not in shown):
            print(_fmt(r))
    d, b = s["default"], s["best"]
    print(f"default: {_fmt(d)}")
    if b:
        gain = d["ms"] / b["ms"] if d["ms"] else float("nan")
        print(f"best:    {_fmt(b)}  ({gain:.3f}x the default's speed)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -P -m pdserve.kernels.tune_prefill",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", default="1024,4096,16384",
                        help="comma-separated sequence lengths (default 1024,4096,16384)")
    parser.add_argument("--tokens", type=int, default=16384,
                        help="tokens per batch, as kernels.bench (default 16384)")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes compiling ahead of timing, 0 = compile in line")
    parser.add_argument("--top", type=int, default=30,
                        help="rows printed per length, 0 = all (the JSON has all)")
    parser.add_argument("--json", metavar="PATH", help="also write every result as JSON")
    args = parser.parse_args(argv)
    seqs = [int(s) for s in args.seq.split(",") if s]
    if not torch.cuda.is_available():
        raise SystemExit("kernels.tune_prefill needs a CUDA GPU (none found): nothing to tune")
    for seq in seqs:
        if seq % BLOCK or seq <= 0:
            parser.error(f"--seq {seq}: must be a positive multiple of the page size {BLOCK}")

    start = time.perf_counter()
    work = [(seq, c) for seq in seqs for c in candidates(seq)]
    print(f"{len(work)} (length, candidate) pairs", file=sys.stderr)
    precompile(work, args.tokens, args.jobs)
    per_seq = []
    for seq in seqs:
        per_seq.append(tune_seq(seq, args.tokens))
        report(per_seq[-1], args.top)

    import triton

    device = torch.cuda.get_device_name()
    print(f"\ndevice: {device}, torch {torch.__version__}, triton {triton.__version__}, "
          f"sweep {time.perf_counter() - start:.0f} s")
    for s in per_seq:
        b = s["best"]
        print(f"best L={s['seq']}: " + (f"{_fmt(b)}" if b else "none"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__,
                       "triton": triton.__version__, "tokens": args.tokens,
                       "seqs": per_seq}, f, indent=1)


if __name__ == "__main__":
    main()
