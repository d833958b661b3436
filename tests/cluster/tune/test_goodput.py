"""The goodput search (``tune.goodput``): bisection on a made-up attainment curve, and the
simulated goodput of deployments whose capacity is known by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pdserve.cluster.bench.config import BenchConfig
from pdserve.cluster.bench.records import Slo
from pdserve.cluster.bench.report import LatencyStats
from pdserve.cluster.tune.goodput import (
    Point,
    backlog_growth,
    capacity_estimate,
    find_goodput,
    measure,
)
from pdserve.cluster.tune.settings import MAX_RATE, TOLERANCE
from pdserve.cluster.tune.workload import Workload
from pdserve_testing.tune import deployment, synthetic_profile

NONE = LatencyStats(0, None, None, None, None)


def point(rate: float, capacity: float) -> Point:
    ok = rate <= capacity
    return Point(rate, 1.0 if ok else 0.5, True, not ok, 100, 0, 0, NONE, NONE, 0.0)


@pytest.mark.parametrize("start", [0.001, 0.5, 3.7, 1000.0])
def test_the_search_brackets_the_highest_rate_met(start: float) -> None:
    capacity = 3.7
    s = find_goodput(lambda r: point(r, capacity), start)
    assert s.bracketed
    assert capacity / (1 + TOLERANCE) <= s.goodput <= capacity
    assert s.at_goodput is not None and s.at_goodput.met(0.9)
    # a missed rate within the tolerance above the goodput was simulated
    assert any(not p.met(0.9) and p.rate <= s.goodput * (1 + TOLERANCE) for p in s.points)


def test_no_rate_met_is_no_goodput_and_every_rate_met_is_not_bracketed() -> None:
    never = find_goodput(lambda r: point(r, 0.0), 1.0)
    assert never.goodput == 0.0 and not never.bracketed and never.at_goodput is None
    always = find_goodput(lambda r: point(r, math.inf), 1.0)
    assert not always.bracketed and always.goodput == MAX_RATE


def test_a_growing_backlog_is_what_the_quarters_say() -> None:
    assert backlog_growth([5] * 40) == 0
    assert backlog_growth(list(range(40))) == pytest.approx(30.0)
    assert backlog_growth([1, 2]) == 0.0  # too few to tell


# A decode step of constant time (no per-sequence or per-token cost) and prefill almost free:
# a seat is held for output_len steps, so S seats serve S / (output_len * step) req/s.
STEP_S, SEATS, OUTPUT_LEN = 0.05, 4, 20
# A prefill step of constant time with a budget of one prompt: 1 / step req/s per worker.
PREFILL_S, PROMPT = 0.125, 32


@pytest.mark.parametrize("case", ["colocated seats", "prefill pool"])
def test_simulated_goodput_meets_a_capacity_known_by_hand(case: str, tmp_path: Path) -> None:
    if case == "colocated seats":
        profile = synthetic_profile(prefill=(1e-4, 0.0, 0.0), decode=(STEP_S, 0.0, 0.0))
        serve = deployment(profile, tmp_path, mode="colocated", num_decode=1,
                           max_num_seqs=SEATS)
        capacity = SEATS / (OUTPUT_LEN * STEP_S)  # 4 req/s
    else:  # 2 prefill workers, a prompt a step each; the decode side never binds
        profile = synthetic_profile(prefill=(PREFILL_S, 0.0, 0.0), decode=(1e-3, 0.0, 0.0))
        serve = deployment(profile, tmp_path, mode="disaggregated", num_prefill=2,
                           num_decode=1, max_batch_tokens=PROMPT, local_prefill_by_model=False)
        capacity = 2 / PREFILL_S  # 16 req/s
    # A TTFT objective of half a request's lifetime (four prefill steps): queueing for a
    # seat or a prefill step is what misses it as the load nears the capacity.
    slo = Slo(ttft_ms=500.0)
    workload = Workload(BenchConfig(input_len=PROMPT, output_len=OUTPUT_LEN),
                        min_window_s=0.0, num_prompts=200)
    estimate = capacity_estimate(serve, profile, workload, slo)
    s = find_goodput(lambda r: measure(serve, profile, workload, r, slo), estimate)
    assert s.bracketed
    # Admission refuses what would miss its TTFT, so the requests it admits are served on
    # time: up to 1 - 0.9 of the arrivals may be shed. Over the window of N counted
    # requests (N / rate seconds) the deployment serves capacity * N / rate of them, plus
    # the queue it holds within the TTFT objective (capacity * objective): 0.9 N met needs
    # rate <= capacity * N / (0.9 N - capacity * objective), never more.
    n, objective = workload.num_prompts, 0.5
    ceiling = capacity * n / (0.9 * n - capacity * objective)
    assert 0.75 * capacity <= s.goodput <= ceiling, (s.goodput, capacity, ceiling)
    assert not any(p.met(0.9) for p in s.points if p.rate > ceiling)
