"""Statistics of a `pdserve bench` run, from its per-request records (``records``): latency
percentiles, throughput, SLO attainment, goodput over a sweep of request rates, and the
result of a whole invocation.

Scope: the request counts, token totals and throughputs (``duration_s``,
``request_throughput``, ``output_throughput``, ``request_goodput``) cover every request sent;
latency percentiles, attainment, the per-class figures and the SLO goodput throughput cover
the counted window only (the requests that arrived after the warm-up share, ``steady``), and
each rate carries its steadiness check.

Definitions (as `vllm bench serve` and DistServe use them):
- TTFT: send -> first response carrying a token. E2E: send -> last response.
- TPOT of a request: (E2E - TTFT) / (output_tokens - 1), for output_tokens > 1.
- ITL: the gap between consecutive responses; a response carrying n tokens spreads its gap
  evenly over them (n values of gap / n), so merged chunks do not hide per-token latency.
- SLO attainment: the fraction of the counted requests (failures, and refusals at admission
  with RESOURCE_EXHAUSTED, count as misses) that meet their TTFT objective and their TPOT
  objective; an absent objective is met. A request's objectives are its SLO class's
  (``classes``), or the one SLO of the run.
- SLO goodput throughput: counted requests meeting their objectives per second of the counted
  window (at a fixed offered rate, the figure to compare two schedulers by).
- Request goodput (vLLM): requests meeting the SLOs per second of one run (all requests).
- Goodput (DistServe): the highest request rate at which at least 90% of requests meet both
  objectives and that is steady (``steady``), read off a sweep of rates.
"""

from __future__ import annotations

import datetime
import math
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pdserve.cluster.bench.classes import ClassReport, Objectives, class_reports
from pdserve.cluster.bench.config import BenchConfig
from pdserve.cluster.bench.records import RequestRecord, Slo
from pdserve.cluster.bench.steady import Steadiness, counted_window, steadiness


@dataclass(frozen=True)
class LatencyStats:
    """Mean and percentiles in ms (None when there are no values)."""

    count: int
    mean_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None


def percentile(values_s: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between order statistics."""
    if not values_s:
        raise ValueError("percentile of no values")
    return float(np.percentile(np.asarray(values_s, dtype=np.float64), q))


def latency_stats(values_s: Sequence[float]) -> LatencyStats:
    if not values_s:
        return LatencyStats(0, None, None, None, None)
    ms = [v * 1e3 for v in values_s]
    return LatencyStats(len(ms), float(np.mean(ms)), percentile(ms, 50), percentile(ms, 90),
                        percentile(ms, 99))


@dataclass(frozen=True)
class RunReport:
    """The summary of one run (one request rate)."""

    label: str
    request_rate: float  # inf: all requests at once
    burstiness: float
    max_concurrency: int | None
    num_requests: int
    completed: int
    failed: int
    failures: dict[str, int]  # gRPC status name -> count
    first_error: str
    duration_s: float  # run start -> the last request's end
    total_input_tokens: int  # completed requests only, as vLLM counts
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    slo_ttft_ms: float | None  # the run's explicit objectives (None: each class's)
    slo_tpot_ms: float | None
    attainment: float  # both objectives, over the counted requests
    attainment_ttft: float
    attainment_tpot: float
    request_goodput: float  # requests meeting both objectives per second (all requests)
    warmup_fraction: float = 0.0
    counted_requests: int = 0  # those sent after the warm-up share of the arrival window
    window_s: float = 0.0  # the counted window: the warm-up cut to the last arrival (inf: run)
    slo_goodput_throughput: float = 0.0  # counted requests meeting theirs, per window second
    steadiness: Steadiness | None = None
    classes: dict[str, ClassReport] = field(default_factory=dict)  # by SLO class

    @property
    def steady(self) -> bool:
        return self.steadiness is not None and self.steadiness.steady


def make_report(label: str, rate: float, burstiness: float, max_concurrency: int | None,
                records: Sequence[RequestRecord], slo: Slo | Objectives,
                warmup_fraction: float = 0.0) -> RunReport:
    objectives = Objectives.of(slo)
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    duration = max((r.end_s for r in records), default=0.0)
    inp = sum(r.prompt_tokens for r in done)
    out = sum(r.output_tokens for r in done)
    # all at once (inf): nothing ramps up before the others, every request counts, and the
    # rates per second are over the run (first send to last answer)
    burst = math.isinf(rate)
    window = counted_window(records, 0.0 if burst else warmup_fraction)
    span = duration - window.first_s if burst else window.span_s
    counted = window.counted
    c_done = [r for r in counted if r.ok]
    met = [objectives.meets(r) for r in counted]
    n = len(counted)
    both = sum(1 for a, b in met if a and b)
    both_all = sum(1 for r in records if objectives.met(r))

    def per_s(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    def frac(k: int) -> float:
        return k / n if n else 0.0

    return RunReport(
        label=label, request_rate=rate, burstiness=burstiness, max_concurrency=max_concurrency,
        num_requests=len(records), completed=len(done), failed=len(failed),
        failures=dict(Counter(r.status for r in failed)),
        first_error=next((f"{r.status}: {r.error}" for r in failed), ""),
        duration_s=duration, total_input_tokens=inp, total_output_tokens=out,
        request_throughput=per_s(len(done)), output_throughput=per_s(out),
        total_token_throughput=per_s(inp + out),
        ttft=latency_stats([v for r in c_done if (v := r.ttft_s) is not None]),
        tpot=latency_stats([v for r in c_done if (v := r.tpot_s) is not None]),
        itl=latency_stats([v for r in c_done for v in r.itl_s()]),
        e2e=latency_stats([v for r in c_done if (v := r.e2e_s) is not None]),
        slo_ttft_ms=objectives.fallback.ttft_ms, slo_tpot_ms=objectives.fallback.tpot_ms,
        attainment=frac(both), attainment_ttft=frac(sum(1 for a, _ in met if a)),
        attainment_tpot=frac(sum(1 for _, b in met if b)), request_goodput=per_s(both_all),
        warmup_fraction=0.0 if burst else warmup_fraction, counted_requests=n, window_s=span,
        slo_goodput_throughput=both / span if span > 0 else 0.0,
        steadiness=steadiness(rate, records, window),
        classes=class_reports(counted, objectives, span),
    )


@dataclass(frozen=True)
class Goodput:
    """DistServe goodput read off a sweep: the highest swept rate with attainment >= target.
    Not bracketed: the sweep did not cross the target (even the highest rate met it, so the
    true goodput may be higher; or no rate met it, so it is below the lowest)."""

    target: float
    rate: float | None
    bracketed: bool
    note: str


def sweep_goodput(points: Sequence[tuple[float, float]], target: float,
                  unsteady: Collection[float] = ()) -> Goodput:
    """`points`: (request rate, SLO attainment) per run, any order; a rate in `unsteady` (its
    queue grew, ``steady``) counts as missed whatever its attainment."""
    pts = sorted(points)
    if not pts:
        return Goodput(target, None, False, "no runs")
    passing = [rate for rate, a in pts if a >= target and rate not in unsteady]
    lo_rate, lo_att = pts[0]
    hi_rate = pts[-1][0]
    if not passing:
        why = ("was not steady" if lo_rate in unsteady and lo_att >= target
               else f"met the SLOs for {lo_att:.1%} < {target:.0%}")
        return Goodput(target, None, False,
                       f"not bracketed: below the lowest rate swept ({fmt_rate(lo_rate)} req/s "
                       f"{why}); sweep lower rates")
    best = max(passing)
    if best == hi_rate:
        return Goodput(target, best, False,
                       f"not bracketed: even the highest rate swept ({fmt_rate(hi_rate)} req/s) "
                       f"met {target:.0%}; goodput is at least this, sweep higher rates")
    above = min(rate for rate, _ in pts if rate > best)
    how = "missed: not steady" if above in unsteady else "missed"
    return Goodput(target, best, True,
                   f"between {fmt_rate(best)} (met) and {fmt_rate(above)} req/s ({how})")


def report_goodput(reports: Sequence[RunReport], target: float) -> Goodput:
    """:func:`sweep_goodput` over the runs of a sweep, each with its steadiness."""
    return sweep_goodput([(r.request_rate, r.attainment) for r in reports], target,
                         {r.request_rate for r in reports if not r.steady})


def rescore_goodput(result: dict[str, Any], slo: Slo | Objectives,
                    target: float = 0.9) -> Goodput:
    """The goodput a saved result (``pdserve bench --result-json``) would show under other
    objectives (a Slo: the same for every request, whatever its class), from its per-request
    records: attainment over the counted window and the steadiness check per rate recomputed
    (the result's own warm-up share; 0 for results written before there was one), then
    :func:`sweep_goodput`. A sweep that stopped early under its own SLO may leave a looser
    objective not bracketed; the returned note says so."""
    warmup = float(result.get("config", {}).get("warmup_fraction", 0.0))
    reports = [make_report("", float(run["report"]["request_rate"]), 1.0, None,
                           [RequestRecord.from_json(r) for r in run["requests"]], slo, warmup)
               for run in result["runs"]]
    return report_goodput(reports, target)


def fmt_rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def jsonable(x: Any) -> Any:
    """Dataclasses/dicts/lists to JSON-ready values: inf -> "inf", nan -> None."""
    if hasattr(x, "__dataclass_fields__"):
        x = asdict(x)
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, float):
        if math.isnan(x):
            return None
        return ("inf" if x > 0 else "-inf") if math.isinf(x) else x
    return x


@dataclass(frozen=True)
class BenchResult:
    """What one `pdserve bench` invocation measured: a report and the records per rate."""

    config: BenchConfig
    model: dict[str, Any]
    reports: list[RunReport]
    records: list[list[RequestRecord]]  # per rate, in the order of config.request_rates
    goodput: Goodput
    server: dict[str, Any] = field(default_factory=dict)  # ServerInfo: scheduler, mode, classes
    objectives: Objectives = field(default_factory=Objectives)  # what requests were scored by
    windows_s: list[float] = field(default_factory=list)  # arrival window asked of each rate

    @property
    def steady_state(self) -> bool:
        """Windows of steady-state length (no --smoke)."""
        return not self.config.smoke

    def to_json(self) -> dict[str, Any]:
        windows: list[float | None] = [*self.windows_s]
        windows += [None] * (len(self.reports) - len(windows))
        return {
            "pdserve_bench": 2, "label": self.config.label,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "steady_state": self.steady_state,
            "config": jsonable(asdict(self.config)), "model": self.model,
            "server": jsonable(self.server), "objectives": self.objectives.to_json(),
            "goodput": jsonable(self.goodput),
            "runs": [{"report": jsonable(rep), "arrival_window_s": jsonable(w),
                      "requests": [r.to_json() for r in recs]}
                     for rep, recs, w in zip(self.reports, self.records, windows, strict=True)],
        }
