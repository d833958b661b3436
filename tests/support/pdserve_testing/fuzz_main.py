"""The full fuzz run (``deploy/fuzz.sh``): a local Ray cluster, a CPU deployment of the
embedded model (the e2e tests' configuration), 10,000 fuzz cases while a greedy neighbour
stream runs, then the table of codes by category and the health checks. Exits 1 if any case
got a code it does not allow, a neighbour stream went wrong, an actor died or a KV block
leaked.

    deploy/fuzz.sh [--count 10000] [--seed 0] [--parallel 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import ray
import torch

from pdserve.cluster.launch import job_runtime_env, launch
from pdserve.engine.model_files import default_gguf_path
from pdserve.proto.client import Client
from pdserve_testing.e2e import HFReference, serve_config
from pdserve_testing.fuzz import ALWAYS_OK, CATEGORIES, Fuzzer
from pdserve_testing.fuzz_run import Neighbour, run
from pdserve_testing.streams import PROMPTS

NEIGHBOUR_TOKENS = 16


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=10_000, help="fuzz cases to send")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parallel", type=int, default=48, help="cases in flight at once")
    ap.add_argument("--deadline", type=float, default=300.0,
                    help="gRPC deadline of each call, in s (a hang guard)")
    ap.add_argument("--refused-only", action="store_true",
                    help="send no case that must succeed (the neighbour still streams)")
    args = ap.parse_args(argv)
    weights = {c: w for c, (w, _) in CATEGORIES.items()}
    if args.refused_only:
        weights = {c: 0.0 if c in ALWAYS_OK else w for c, w in weights.items()}

    gguf = default_gguf_path()
    torch.set_num_threads(os.cpu_count() or 1)
    ref = HFReference(gguf)
    ids = ref.tokenizer(PROMPTS[0])["input_ids"]
    neighbour = Neighbour(ids, ref.greedy(ids, NEIGHBOUR_TOKENS))
    ray.init(address="local", namespace="pdserve-fuzz", include_dashboard=False, num_cpus=8,
             object_store_memory=200 * 1024 * 1024, log_to_driver=False,
             runtime_env=job_runtime_env())
    dep = launch(serve_config(gguf, "fuzz"))
    try:
        with Client(dep.address) as client:
            fz = Fuzzer.for_server(args.seed, client.model_info(), client.server_info())
        cases = fz.cases(args.count, weights)
        report = run(dep, cases, neighbour, args.parallel, args.deadline)
    finally:
        dep.stop()
        ray.shutdown()
    print(f"pdserve fuzz: {args.count} cases, seed {args.seed}, {args.parallel} in flight, "
          f"deadline {args.deadline:g} s; "
          f"{os.cpu_count()} CPUs, {platform.platform()}, {time.strftime('%Y-%m-%d')}")
    print(report.table())
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
