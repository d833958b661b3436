"""One deployment's goodput, predicted: attainment at a rate (a steady-state simulated run),
and the rate search that finds the highest rate meeting the target.

The definition is DistServe's, as ``pdserve bench`` reads it off a sweep
(``bench.report``): the highest request rate at which at least ``target`` (0.9) of the
requests meet both their TTFT and TPOT objectives, a refused or failed request counting as
a miss. A rate counts as met only in steady state: besides the attainment, the number of
requests in flight on the router must not grow over the counted window (by more than the
share of requests allowed to miss: a growing backlog is one whose later requests would miss,
however long the window ran). A run stops as soon as more counted requests missed than the
target allows (the rate is missed whatever the rest do); the point is then marked partial,
and its attainment counts the requests that had not ended as misses (a lower bound).

The search brackets the goodput from the cost model's estimate (``capacity_estimate``),
stepping up while the rate is met and down while it is not (by ``BRACKET_STEP``, squared at
each step, so that an estimate far off costs few steps), then bisects (geometric midpoints)
until the bracket is within ``tolerance``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from pdserve.cluster.bench.records import Slo
from pdserve.cluster.bench.report import LatencyStats, make_report
from pdserve.cluster.config import ServeConfig
from pdserve.cluster.tune.settings import (
    BRACKET_STEP,
    MAX_POINTS,
    MAX_RATE,
    MIN_RATE,
    TARGET,
    TOLERANCE,
)
from pdserve.cluster.tune.sim import Simulation
from pdserve.cluster.tune.workload import Workload
from pdserve.engine.config import blocks_for
from pdserve.router.cost_model import CostModel, Profile


@dataclass(frozen=True)
class Point:
    """One simulated rate: SLO attainment of the counted requests and their latencies."""

    rate: float
    attainment: float  # both objectives, over all counted requests (partial: a lower bound)
    stable: bool  # the backlog did not grow over the window
    partial: bool  # stopped once the target could no longer be met (or stalled)
    counted: int
    refused: int
    preemptions: int
    ttft: LatencyStats
    tpot: LatencyStats
    backlog_growth: float  # requests in flight, last quarter of the window minus first

    def met(self, target: float) -> bool:
        return self.stable and not self.partial and self.attainment >= target


def backlog_growth(backlog: list[int]) -> float:
    """Mean requests in flight over the last quarter of arrivals minus the first quarter."""
    q = len(backlog) // 4
    if q == 0:
        return 0.0
    return (sum(backlog[-q:]) - sum(backlog[:q])) / q


def measure(serve: ServeConfig, profile: Profile, workload: Workload, rate: float, slo: Slo,
            target: float = TARGET, stop_early: bool = True) -> Point:
    """Simulate ``serve`` at ``rate`` over the workload's window for that rate."""
    win = workload.window(rate, unloaded_e2e_s(profile, workload))
    allowed = math.floor((1 - target) * win.counted + 1e-9)
    watch = replace(win.watch, max_misses=allowed if stop_early else None)
    res = Simulation(serve, profile).run(workload.requests(rate, win.total), slo, watch)
    rep = make_report("tune", rate, workload.bench.burstiness, None, res.records, slo)
    # Attainment over every counted request: those a partial run never saw end missed.
    met = sum(1 for r in res.records if all(slo.meets(r)))
    growth = backlog_growth(res.backlog)
    return Point(
        rate=rate, attainment=met / win.counted, stable=growth <= allowed,
        partial=res.stopped_early, counted=win.counted, refused=rep.failures.get(
            "RESOURCE_EXHAUSTED", 0), preemptions=res.preemptions, ttft=rep.ttft,
        tpot=rep.tpot, backlog_growth=growth)


@dataclass(frozen=True)
class Search:
    """A deployment's goodput and the rates simulated to find it."""

    goodput: float  # req/s; 0.0 when even MIN_RATE is missed
    bracketed: bool  # a missed rate lies within the tolerance above the goodput
    points: tuple[Point, ...]  # in the order simulated
    error: str = ""  # the deployment cannot serve the workload at all (SimulationError)

    @property
    def at_goodput(self) -> Point | None:
        return next((p for p in self.points if p.rate == self.goodput), None)


def find_goodput(evaluate: Callable[[float], Point], start: float, target: float = TARGET,
                 tolerance: float = TOLERANCE) -> Search:
    """The highest rate ``evaluate`` finds met, searched from ``start`` req/s."""
    points: list[Point] = []

    def met(rate: float) -> bool:
        p = evaluate(rate)
        points.append(p)
        return p.met(target)

    lo, hi = 0.0, math.inf
    rate, step = max(start, MIN_RATE), BRACKET_STEP
    while len(points) < MAX_POINTS:  # bracket, the step squared at each move (from far off)
        if met(rate):
            lo = rate
            if hi < math.inf or rate >= MAX_RATE:
                break
            rate = min(rate * step, MAX_RATE)
        else:
            hi = rate
            if lo > 0 or rate <= MIN_RATE:
                break
            rate = max(rate / step, MIN_RATE)
        step *= step
    while lo > 0 and hi < math.inf and hi > lo * (1 + tolerance) and len(points) < MAX_POINTS:
        mid = math.sqrt(lo * hi)
        if met(mid):
            lo = mid
        else:
            hi = mid
    return Search(lo, lo > 0 and hi <= lo * (1 + tolerance), tuple(points))


def capacity_estimate(serve: ServeConfig, profile: Profile, workload: Workload,
                      slo: Slo) -> float:
    """A rough goodput from the cost model alone, where the search starts: each decode
    worker holds the batch whose step meets the TPOT objective (and fits its KV), each
    prompt costs its share of prefill steps, and the slower pool sets the rate."""
    model = CostModel(profile)
    n_in, n_out = workload.mean_lengths()
    context = n_in + n_out / 2
    seats = min(serve.max_num_seqs,
                max(1, serve.decode_blocks // blocks_for(int(n_in + n_out), serve.block_size)))
    if slo.tpot_ms is not None:
        while seats > 1 and model.decode_step_s(seats, int(seats * context)) > slo.tpot_ms / 1e3:
            seats -= 1
    decode_s = n_out * model.decode_step_s(seats, int(seats * context)) / seats  # per request
    fit = profile.prefill
    prefill_s = fit.b * n_in + fit.c * n_in * n_in + fit.a * max(1.0, n_in / serve.max_batch_tokens)
    if serve.colocated:
        return serve.num_decode / (prefill_s + decode_s)
    return min(serve.num_prefill / prefill_s, serve.num_decode / decode_s)


def unloaded_e2e_s(profile: Profile, workload: Workload) -> float:
    """A mean request's lifetime on an idle deployment (its prefill, then its tokens one
    decode step each): a floor on the median E2E that sizes the steady-state window."""
    model = CostModel(profile)
    n_in, n_out = workload.mean_lengths()
    n = int(n_in)
    return (model.prefill_step_s(n, n * n) + model.transfer_s(n)
            + n_out * model.decode_step_s(1, int(n_in + n_out / 2)))
