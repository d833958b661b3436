"""``pdserve tune`` itself: the search space from the flags, the search, and what it
prints and writes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from pdserve.cluster.bench.config import BenchConfig
from pdserve.cluster.bench.records import Slo
from pdserve.cluster.bench.report import jsonable
from pdserve.cluster.config import ServeConfig
from pdserve.cluster.tune.goodput import Point
from pdserve.cluster.tune.report import (
    format_sweep_line,
    format_table,
    label,
    outcome_json,
    plot_sweeps,
    serve_command,
    sweep_result,
)
from pdserve.cluster.tune.search import Job, Outcome, Runner, Space, search
from pdserve.cluster.tune.settings import AUTO_RULE, PLOT_RATES
from pdserve.cluster.tune.workload import Workload
from pdserve.engine.config import CPU_DECODE_BLOCKS, CPU_PREFILL_BLOCKS
from pdserve.router.cost_model import Profile


def pool_blocks(profile: Profile, given: int, cpu_default: int) -> int:
    """A worker's KV pool: as given, else the profile's (a GPU's pool is sized from its
    memory, as it was when profiled), else the CPU default."""
    if given:
        return given
    if profile.device == "cpu":
        return cpu_default
    if "kv_pool_blocks" in profile.notes:
        return int(profile.notes["kv_pool_blocks"])
    raise ValueError(f"profile of {profile.device}: give --prefill-blocks and --decode-blocks "
                     "(a worker's KV pool on that GPU; `pdserve serve` logs it)")


def parse_rules(text: str, workload: Workload) -> tuple[str, ...]:
    rules: list[str] = []
    for r in (x.strip() for x in text.split(",") if x.strip()):
        if r == AUTO_RULE:
            inp, _ = workload.lengths(max(workload.num_prompts, 200))
            n = int(np.percentile(inp, 25))
            if min(inp) <= n < max(inp):  # some prompts local, some not
                rules.append(str(n))
        elif r not in rules:
            rules.append(r)
    return tuple(rules)


def build(args: argparse.Namespace) -> tuple[Space, Job]:
    """The search space and the shared job from the flags (ValueError: a bad value)."""
    profile = Profile.load(args.profile)
    bench = BenchConfig(
        dataset=args.dataset, input_len=args.input_len,
        output_len=args.output_len, input_len_dist=args.input_len_dist,
        output_len_dist=args.output_len_dist, range_ratio=args.range_ratio,
        burstiness=args.burstiness, seed=args.seed, slo=Slo(args.slo_ttft_ms, args.slo_tpot_ms),
        goodput_attainment=args.goodput_attainment)
    workload = Workload(bench, args.warmup_share, args.min_window_s, args.num_prompts)
    base = ServeConfig(
        scheduler=args.scheduler, profile=str(Path(args.profile).resolve()),
        block_size=profile.block_size,
        prefill_blocks=pool_blocks(profile, args.prefill_blocks, CPU_PREFILL_BLOCKS),
        decode_blocks=pool_blocks(profile, args.decode_blocks, CPU_DECODE_BLOCKS))
    space = Space(args.gpus, args.max_num_seqs, args.max_batch_tokens,
                  parse_rules(args.rules, workload), base)
    if not 0 < args.tolerance < 1:
        raise ValueError(f"--tolerance must be in (0, 1), got {args.tolerance}")
    return space, Job(profile, workload, bench.slo, bench.goodput_attainment, args.tolerance)


def run(args: argparse.Namespace) -> int:
    """Search, print the table, the winner and its serve command; --json, --plot."""
    t0 = time.perf_counter()
    try:
        space, job = build(args)
    except (OSError, ValueError) as e:
        print(f"pdserve tune: error: {e}", file=sys.stderr)
        return 2

    def say(msg: str) -> None:
        print(f"pdserve tune: {msg} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)

    sweeps: list[tuple[Outcome, list[Point]]] = []
    with Runner(job, args.jobs) as runner:
        outcomes = search(space, runner, say)
        best = outcomes[0]
        if args.plot and best.goodput > 0:
            # The winner, and the best deployment of the other mode (colocated or not).
            other = next((o for o in outcomes if o.serve.colocated != best.serve.colocated
                          and o.goodput > 0), None)
            rates = [best.goodput * f for f in PLOT_RATES]
            sweeps = [(o, runner.sweep(o.serve, rates)) for o in (best, other) if o]
    wall = time.perf_counter() - t0
    slo = job.slo
    print(f"pdserve tune: {space.gpus} GPUs, {job.profile.device} / {job.profile.model}, "
          f"SLO TTFT {slo.ttft_ms or '-'} ms, TPOT {slo.tpot_ms or '-'} ms, "
          f"{job.target:.0%} attainment")
    print(format_table(outcomes, space.gpus))
    if best.goodput > 0:
        print(f"best: {label(best.serve)}: {best.goodput:.3g} req/s, "
              f"{best.goodput / space.gpus:.3g} per GPU")
        print(f"  {serve_command(best.serve)}")
    else:
        print("best: none: no deployment meets the objectives at any rate searched")
    for o, pts in sweeps:
        print(format_sweep_line(f"attainment of {label(o.serve)}", pts))
    print(f"searched {len(outcomes)} deployments in {wall:.1f} s ({runner.jobs} processes)")
    if args.json:
        out = {"pdserve_tune": 1, "gpus": space.gpus, "profile": str(args.profile),
               "device": job.profile.device, "model": job.profile.model,
               "slo": dataclasses.asdict(slo), "target": job.target,
               "workload": jsonable(dataclasses.asdict(job.workload.bench)), "wall_s": wall,
               "best": outcome_json(best, space.gpus) if best.goodput > 0 else None,
               "deployments": [outcome_json(o, space.gpus) for o in outcomes],
               "sweeps": [sweep_result(label(o.serve), pts, slo, job.target)
                          for o, pts in sweeps]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if sweeps:
        png = plot_sweeps([sweep_result(label(o.serve), pts, slo, job.target)
                           for o, pts in sweeps], args.plot, job.target)
        print(f"plot: {png}", file=sys.stderr)
    return 0
