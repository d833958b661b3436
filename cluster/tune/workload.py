"""What ``pdserve tune`` simulates at each request rate: ``pdserve bench``'s workload (its
``BenchConfig``: dataset, length distributions, arrival process) over a steady-state window.

A rate's run sends ``warmup`` requests that are not counted (the deployment fills up), then
the ``counted`` requests it is scored on, then ``warmup`` more that keep the load on while the
counted ones finish (so the last of them are not served by an emptying deployment). Lengths
are drawn as ``pdserve bench`` draws them (``bench.workload.workload_lengths``, the same seed
giving the same prompts); arrival times are ``bench.data.arrival_offsets`` at the rate, the
same seed giving the same gaps scaled by 1/rate (so attainment against rate is a smooth
curve, not noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pdserve.cluster.bench.config import BenchConfig
from pdserve.cluster.bench.data import arrival_offsets
from pdserve.cluster.bench.workload import workload_lengths
from pdserve.cluster.tune.settings import (
    E2E_LIFETIMES,
    MAX_COUNTED,
    MIN_WINDOW_S,
    NUM_PROMPTS,
    WARMUP_SHARE,
)
from pdserve.cluster.tune.sim import SimRequest, Watch


@dataclass(frozen=True)
class Window:
    """How many requests a rate's run sends and counts."""

    counted: int
    warmup: int

    def __post_init__(self) -> None:
        if self.counted < 1 or self.warmup < 0:
            raise ValueError(f"a window counts >= 1 requests after >= 0 of warm-up, got "
                             f"{self.counted} and {self.warmup}")

    @property
    def total(self) -> int:
        return self.counted + 2 * self.warmup

    @property
    def watch(self) -> Watch:
        return Watch(self.warmup, self.warmup + self.counted)


@dataclass(frozen=True)
class Workload:
    """The requests of every rate's run: ``num_prompts`` counted at least, more where
    the rate is high enough that they would arrive within ``min_window_s``."""

    bench: BenchConfig
    warmup_share: float = WARMUP_SHARE
    min_window_s: float = MIN_WINDOW_S
    num_prompts: int = NUM_PROMPTS  # counted requests per rate, at least

    def __post_init__(self) -> None:
        if self.bench.dataset == "jsonl":
            raise ValueError("pdserve tune simulates the random and chat datasets (a JSONL "
                             "file's prompt lengths need the model's tokenizer)")
        if not 0 <= self.warmup_share <= 1:
            raise ValueError(f"the warm-up share must be in [0, 1], got {self.warmup_share}")
        if not self.min_window_s >= 0:
            raise ValueError(f"the window must be >= 0 s, got {self.min_window_s}")

    def window(self, rate: float, e2e_s: float = 0.0) -> Window:
        """The window at ``rate``: ``num_prompts`` counted requests, or as many as
        arrive in ``min_window_s`` or in ten request lifetimes (``e2e_s``), if more (up to
        ``MAX_COUNTED``)."""
        span = max(self.min_window_s, E2E_LIFETIMES * e2e_s)
        counted = max(self.num_prompts,
                      min(MAX_COUNTED, math.ceil(rate * span - 1e-9)))
        return Window(counted, math.ceil(counted * self.warmup_share))

    def lengths(self, n: int) -> tuple[list[int], list[int]]:
        """The first ``n`` requests' (input, output) lengths."""
        inp, out = workload_lengths(self.bench, np.random.default_rng(self.bench.seed), n)
        return [int(x) for x in inp], [int(x) for x in out]

    def requests(self, rate: float, n: int) -> list[SimRequest]:
        """``n`` requests at ``rate`` req/s."""
        inp, out = self.lengths(n)
        at = arrival_offsets(n, rate, self.bench.burstiness, self.bench.seed)
        return [SimRequest(i, float(at[i]), inp[i], out[i]) for i in range(n)]

    def mean_lengths(self, n: int = 1000) -> tuple[float, float]:
        inp, out = self.lengths(n)
        return float(np.mean(inp)), float(np.mean(out))
