"""The workload flags of `pdserve bench` (what its requests are: the dataset, its lengths and
sampling), read into ``BenchConfig`` by ``cluster.cli``."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from pdserve.cluster.bench.data import DATASETS, LENGTH_DISTS
from pdserve.cluster.bench.multiturn import SYSTEM_PROMPT_LEN, TURNS, USERS


def add_workload_flags(p: argparse.ArgumentParser, replaced: Iterable[str]) -> None:
    """The "workload" group of ``p``; ``replaced``: old flags, accepted only to be refused
    with a pointer to their replacement."""
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", choices=DATASETS, default="random",
                   help="random token prompts; a ShareGPT-like length mix; a JSONL file; or "
                        "multi-turn chats sharing a system prompt (random tokens; the user "
                        "messages --input-len, the answers --output-len)")
    g.add_argument("--dataset-path", metavar="FILE.jsonl",
                   help='JSONL: {"prompt": str} or {"messages": [...]}, optional "max_tokens"')
    for old in replaced:  # refused with a pointer to their replacement
        g.add_argument(old, help=argparse.SUPPRESS)
    g.add_argument("--system-prompt-len", type=int, default=SYSTEM_PROMPT_LEN,
                   help="multiturn: tokens of the system prompt every conversation shares")
    g.add_argument("--turns", type=int, default=TURNS, help="multiturn: turns per conversation")
    g.add_argument("--users", type=int, default=USERS,
                   help="multiturn: conversations running side by side")
    g.add_argument("--input-len", type=int, default=512,
                   help="random: mean prompt tokens; multiturn: mean user message tokens")
    g.add_argument("--output-len", type=int, default=128,
                   help="random: mean output tokens; multiturn: of each answer; jsonl: when a "
                        "line gives none")
    g.add_argument("--input-len-dist", choices=LENGTH_DISTS, default="fixed")
    g.add_argument("--output-len-dist", choices=LENGTH_DISTS, default="fixed")
    g.add_argument("--range-ratio", type=float, default=0.0,
                   help="spread r: uniform in [L(1-r), L(1+r)], normal std rL, lognormal "
                        "log-std r")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--ignore-eos", action="store_true",
                   help="chat/jsonl: generate exactly max_tokens (random and multiturn always "
                        "do)")
