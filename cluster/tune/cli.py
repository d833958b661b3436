"""The flags of ``pdserve tune`` (the command itself is ``tune.command``, imported when it
runs, so that ``pdserve`` starts without loading the simulator)."""

from __future__ import annotations

import argparse

from pdserve.cluster.bench.config import BenchConfig
from pdserve.cluster.bench.data import LENGTH_DISTS
from pdserve.cluster.tune import settings as t
from pdserve.engine.config import CPU_DECODE_BLOCKS, CPU_PREFILL_BLOCKS


def _listed(values: tuple[object, ...]) -> str:
    return ",".join(map(str, values))


def _ints(s: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, comma-separated: {s!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1: {s!r}")
    return values


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "tune", allow_abbrev=False,
        help="predict the deployment of N GPUs with the best goodput (simulated)",
        description="Simulate deployments of --gpus workers (the router's real admission, "
                    "ordering and placement, the workers' real schedulers, step times from "
                    "the cost profile) on the workload `pdserve bench` would send, find "
                    "each one's goodput (the highest rate at which --goodput-attainment of "
                    "requests meet both SLOs), and print the best with its `pdserve serve` "
                    "command.")
    p.add_argument("--profile", required=True, metavar="PROFILE.json",
                   help="the cost profile (`pdserve profile`) of the device and model")
    p.add_argument("--gpus", type=int, default=t.GPUS,
                   help=f"GPUs (one worker each; default {t.GPUS})")
    g = p.add_argument_group("workload (as `pdserve bench` sends it)")
    b = BenchConfig  # the defaults of `pdserve bench`'s workload flags
    g.add_argument("--dataset", choices=("random", "chat"), default=b.dataset)
    g.add_argument("--num-prompts", type=int, default=t.NUM_PROMPTS,
                   help="requests counted at each rate (more where the steady-state window "
                        f"needs them; default {t.NUM_PROMPTS})")
    g.add_argument("--input-len", type=int, default=b.input_len, help="mean prompt tokens")
    g.add_argument("--output-len", type=int, default=b.output_len, help="mean output tokens")
    g.add_argument("--input-len-dist", choices=LENGTH_DISTS, default=b.input_len_dist)
    g.add_argument("--output-len-dist", choices=LENGTH_DISTS, default=b.output_len_dist)
    g.add_argument("--range-ratio", type=float, default=b.range_ratio,
                   help="spread r: uniform in [L(1-r), L(1+r)], normal std rL, lognormal "
                        "log-std r")
    g.add_argument("--burstiness", type=float, default=b.burstiness,
                   help="gamma shape of the gaps: 1 = Poisson, <1 burstier")
    g.add_argument("--seed", type=int, default=b.seed)
    g = p.add_argument_group("objectives")
    g.add_argument("--slo-ttft-ms", type=float, help="TTFT objective (default: none)")
    g.add_argument("--slo-tpot-ms", type=float, help="TPOT objective (default: none)")
    g.add_argument("--goodput-attainment", type=float, default=t.TARGET,
                   help="share of requests that must meet both (DistServe: 0.9)")
    g = p.add_argument_group("search")
    g.add_argument("--max-num-seqs", type=_ints, default=t.MAX_NUM_SEQS_GRID, metavar="N[,N]",
                   help="batch caps to try, the first as the base (default "
                   f"{_listed(t.MAX_NUM_SEQS_GRID)})")
    g.add_argument("--max-batch-tokens", type=_ints, default=t.MAX_BATCH_TOKENS_GRID,
                   metavar="N[,N]", help="step token budgets to try, the first as the base "
                   f"(default {_listed(t.MAX_BATCH_TOKENS_GRID)})")
    g.add_argument("--rules", default=_listed(t.RULES),
                   metavar="R[,R]", help="conditional disaggregation to try: model (the cost "
                   "model decides, the serve default), off, N (prompts <= N tokens prefill on "
                   "the decode worker), auto (N = the workload's 25th-percentile prompt, if "
                   "that splits it)")
    g.add_argument("--scheduler", choices=("slo", "fifo"), default="slo")
    g.add_argument("--prefill-blocks", type=int, default=0,
                   help="KV blocks per prefill worker (default: the profile's pool on a GPU, "
                        f"{CPU_PREFILL_BLOCKS} on CPU)")
    g.add_argument("--decode-blocks", type=int, default=0,
                   help="KV blocks per decode worker (default: the profile's pool on a GPU, "
                        f"{CPU_DECODE_BLOCKS} on CPU)")
    g.add_argument("--tolerance", type=float, default=t.TOLERANCE,
                   help=f"the rate search stops within this ratio (default {t.TOLERANCE})")
    g.add_argument("--warmup-share", type=float, default=t.WARMUP_SHARE,
                   help="requests before (and after) the counted ones, as a share of them")
    g.add_argument("--min-window-s", type=float, default=t.MIN_WINDOW_S,
                   help="the counted requests arrive over at least this long "
                   f"(default {t.MIN_WINDOW_S:g})")
    g.add_argument("--jobs", type=int, default=0, help="processes (default: the CPUs)")
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="OUT", help="write every deployment's figures here")
    g.add_argument("--plot", metavar="DIR", help="draw predicted attainment against rate")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from pdserve.cluster.tune.command import run

    return run(args)


