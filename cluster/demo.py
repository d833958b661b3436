"""``make demo``: a local deployment, streamed answers to a few chat prompts, a table."""

from __future__ import annotations

import dataclasses
import sys
import threading
from dataclasses import dataclass

from pdserve.cluster.config import ServeConfig
from pdserve.cluster.launch import launch
from pdserve.proto.client import Client

# The sampling SmolLM2-Instruct's model card uses (temperature 0.2, top-p 0.9): greedy decoding
# of the 135M model can loop on a prompt ("1. **1011111..."; transformers' own greedy output is
# the same). A fixed seed per request makes each answer reproducible, batched or not (the
# sampler's draws are keyed by seed and output position). Token-exact tests stay greedy.
TEMPERATURE = 0.2
TOP_P = 0.9
SEED = 0

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning to cook.",
    "What does a GPU do that a CPU does not?",
]


@dataclass
class Row:
    prompt: str
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    tokens: int = 0
    finish: str = ""


def _ask(client: Client, prompt: str, max_tokens: int, row: Row, echo: bool) -> None:
    for resp in client.generate(messages=[("user", prompt)], max_tokens=max_tokens,
                                temperature=TEMPERATURE, top_p=TOP_P, seed=SEED):
        if echo:
            sys.stdout.write(resp.text)
            sys.stdout.flush()
        if resp.finished:
            row.ttft_ms = resp.timing.ttft_s * 1e3
            row.tpot_ms = resp.timing.mean_tpot_s * 1e3
            row.tokens = resp.usage.completion_tokens
            row.finish = resp.finish_reason


def run_demo(cfg: ServeConfig, max_tokens: int) -> int:
    cfg = dataclasses.replace(cfg, port=0, metrics_port=0)
    print("Starting a local Ray cluster: 1 prefill worker, 1 decode worker, router...")
    dep = launch(cfg)
    try:
        with Client(dep.address) as client:
            info = client.model_info()
            print(f"Serving {info.model_name} on {dep.address}; sampling: temperature "
                  f"{TEMPERATURE}, top-p {TOP_P}, seed {SEED}\n")
            rows = [Row(p) for p in PROMPTS]
            # One request streams to the terminal at a time; the others of the batch then
            # run concurrently, to show continuous batching across the two workers.
            for row in rows:
                print(f"\033[1m> {row.prompt}\033[0m")
                _ask(client, row.prompt, max_tokens, row, echo=True)
                print("\n")
            print(f"Now all {len(rows)} prompts at once (batched)...")
            batch = [Row(p) for p in PROMPTS]
            threads = [threading.Thread(target=_ask, args=(client, r.prompt, max_tokens, r,
                                                           False)) for r in batch]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            _table("one at a time", rows)
            _table("all at once", batch)
            print(f"\nMetrics were at http://{cfg.host}:{dep.metrics_port}/metrics")
    finally:
        dep.stop()
    return 0


def _table(title: str, rows: list[Row]) -> None:
    print(f"\n{title} (temperature {TEMPERATURE}, top-p {TOP_P}, seed {SEED}):")
    print(f"{'#':>2}  {'prompt':<46} {'TTFT ms':>8} {'TPOT ms':>8} {'tokens':>6}  finish")
    for i, r in enumerate(rows):
        print(f"{i:>2}  {r.prompt[:46]:<46} {r.ttft_ms:>8.1f} {r.tpot_ms:>8.1f} "
              f"{r.tokens:>6}  {r.finish}")
