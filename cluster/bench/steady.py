"""Steady state in `pdserve bench`: how long each rate runs, which of its requests count, and
whether the deployment sustained the rate or only absorbed it.

A window shorter than a few request lifetimes measures how big a burst the batch absorbs,
not the rate the deployment sustains: every rate of a sweep starts on an idle server, and a
queue that grows at 20% of the rate still leaves most requests of a 5 s window on time.

**Window.** Each rate sends arrivals over at least ``max(min_duration_s, duration_factor x
the median E2E latency of the previous steady rate)`` and at least ``min_requests``
requests: ``max(min_requests, ceil(rate x window))`` requests (``--request-rate inf``, all
at once: ``min_requests``). The previous *steady* rate, not simply the previous one: a rate
whose queue grew has no request lifetime (its median E2E grows with its own window), and
taking it would grow every later window geometrically. The first rate, and any after only
unsteady ones, take ``min_duration_s``. The defaults (60 s, 10x, 500 requests, warm-up 0.2)
are the least a steady-state run takes; smaller values need ``--smoke``, and the result then
says ``steady_state: false``.

**Counted window.** The requests that arrive in the first ``warmup_fraction`` of the arrival
window (first to last send) are not counted: the server ramps up from idle there. Attainment,
latency percentiles and goodput count the rest, and rates per second are over the counted
window's length (from the warm-up cut to the last arrival). A rate sent all at once (inf)
has no ramp to cut: every request counts, and its rates are per second of the whole run.

**Steadiness rule.** A rate is *not steady* (its queue still grows) when, over the counted
window,

- answers per second < ``MIN_COMPLETION_RATIO`` (0.9) x arrivals per second, where answers are
  the requests whose answer ended inside the window (completed, or refused at admission
  with RESOURCE_EXHAUSTED: a server that sheds load keeps its queue bounded, and the refusals
  count as misses in attainment instead), and arrivals the counted requests; or
- TTFT p50 of the last third of the counted arrivals > ``MAX_TTFT_GROWTH`` (2) x TTFT p50 of
  the first third, in any SLO class (a queue that grows at a rate below the 10% the first
  test resolves still shows in waiting time: under a growing queue TTFT rises about linearly
  with arrival time, and the medians of the thirds of the counted window, 20% to 100% of
  the arrivals, lie at about 33% and 87% of it). Per class, because the classes' TTFTs
  differ by design: the median of a 50/50 mix of 50 ms and 2 s requests lies between them
  and jumps with each third's share of each class; and a queue that grows for one class
  only (best-effort requests behind prioritized ones) is still a growing queue.

Arrivals are measured (counted requests over the window's length), not the nominal rate: a
Poisson count of 400 varies by 5% at one sigma, which against a 10% tolerance would flag
about one steady rate in forty. A rate sent all at once (``inf``) is never steady (a burst),
nor one with too few counted requests to judge. A not-steady rate counts as missed in
goodput (``report.sweep_goodput``) and stops a sweep with ``--stop-below-attainment``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.cluster.bench.records import REFUSED, RequestRecord

# The least a steady-state window takes (the CLI's defaults); less needs --smoke.
STEADY_MIN_DURATION_S = 60.0
STEADY_DURATION_FACTOR = 10.0
STEADY_MIN_REQUESTS = 500
STEADY_WARMUP_FRACTION = 0.2
MAX_WARMUP_FRACTION = 0.9  # something must be left to count

MIN_COMPLETION_RATIO = 0.9
MAX_TTFT_GROWTH = 2.0
MIN_COUNTED = 3  # a third of fewer than one request says nothing


def arrival_window_s(min_duration_s: float, duration_factor: float,
                     prev_e2e_p50_s: float | None) -> float:
    """Seconds of arrivals a rate needs: ``min_duration_s``, or ``duration_factor`` times the
    previous steady rate's median E2E where that is longer."""
    if prev_e2e_p50_s is None or not math.isfinite(prev_e2e_p50_s):
        return min_duration_s
    return max(min_duration_s, duration_factor * prev_e2e_p50_s)


def requests_for_rate(rate: float, window_s: float, min_requests: int) -> int:
    """``max(min_requests, ceil(rate * window_s))``; all at once (inf): ``min_requests``."""
    if math.isinf(rate):
        return min_requests
    # the epsilon keeps a product like 0.55 * 100 = 55.00000000000001 at 55
    return max(min_requests, math.ceil(rate * window_s - 1e-9))


@dataclass(frozen=True)
class Window:
    """The counted part of a run: the requests sent at or after ``cut_s``; times in seconds
    since the run started."""

    first_s: float  # the first send
    cut_s: float  # first_s + warmup_fraction * (last_s - first_s)
    last_s: float  # the last send
    counted: tuple[RequestRecord, ...]  # by send time

    @property
    def span_s(self) -> float:
        return self.last_s - self.cut_s


def counted_window(records: Sequence[RequestRecord], warmup_fraction: float) -> Window:
    """Leave out the requests sent in the first ``warmup_fraction`` of the arrival window."""
    if not records:
        return Window(0.0, 0.0, 0.0, ())
    by_send = sorted(records, key=lambda r: (r.send_s, r.index))
    first, last = by_send[0].send_s, by_send[-1].send_s
    cut = first + warmup_fraction * (last - first)
    return Window(first, cut, last, tuple(r for r in by_send if r.send_s >= cut))


@dataclass(frozen=True)
class Steadiness:
    """The steadiness check of one rate (see the module docstring); None: not measurable."""

    offered_rate: float  # the nominal rate, req/s (inf: all at once)
    arrival_rate: float | None  # counted requests per second of the counted window
    answer_rate: float | None  # answers ending in the counted window, per second of it
    completion_ratio: float | None  # answer_rate / arrival_rate
    ttft_p50_first_ms: float | None  # first third of the counted arrivals (of ttft_class)
    ttft_p50_last_ms: float | None  # last third
    ttft_growth: float | None  # last / first
    ttft_class: str  # the SLO class whose TTFT grew most ("": none named)
    steady: bool
    reason: str  # why not steady ("" when steady)


def _p50_ms(records: Sequence[RequestRecord]) -> float | None:
    v = [t for r in records if (t := r.ttft_s) is not None]
    return float(np.percentile(v, 50)) * 1e3 if v else None


def answered(r: RequestRecord) -> bool:
    """The server gave its answer: completed, or refused at admission."""
    return r.ok or r.status == REFUSED


def _thirds(counted: Sequence[RequestRecord]) -> tuple[float | None, float | None]:
    """TTFT p50 (ms) of the first and of the last third of these arrivals."""
    third = len(counted) // 3
    if not third:
        return None, None
    return _p50_ms(counted[:third]), _p50_ms(counted[len(counted) - third:])


def ttft_growth(counted: Sequence[RequestRecord]
                ) -> tuple[str, float | None, float | None, float | None]:
    """(class, first, last, last / first) of the SLO class whose TTFT p50 grew most from the
    first third of its counted arrivals to the last. Per class: the classes' TTFTs differ by
    design, and the median of a mix lies between them, moving with each third's share of
    each class."""
    by: dict[str, list[RequestRecord]] = {}
    for r in counted:
        by.setdefault(r.slo_class, []).append(r)
    rows = [(name, *_thirds(recs)) for name, recs in by.items()]
    grown = [(name, a, b, b / a) for name, a, b in rows if a and b is not None]
    if grown:
        return max(grown, key=lambda row: row[3])
    return next(((name, a, b, None) for name, a, b in rows if a is not None),
                ("", None, None, None))


def steadiness(rate: float, records: Sequence[RequestRecord], window: Window) -> Steadiness:
    """The check over ``window`` (from ``counted_window(records, ...)``)."""
    counted = window.counted
    cls, first, last, growth = ttft_growth(counted)
    span = window.span_s
    arrival = answer = ratio = None
    if span > 0 and math.isfinite(rate):
        arrival = len(counted) / span
        answer = sum(1 for r in records
                     if answered(r) and window.cut_s <= r.end_s <= window.last_s) / span
        ratio = answer / arrival
    reason = ""
    if math.isinf(rate):
        reason = "all at once: a burst has no steady state"
    elif len(counted) < MIN_COUNTED or ratio is None:
        reason = f"{len(counted)} counted requests: too few to judge"
    elif ratio < MIN_COMPLETION_RATIO:
        reason = (f"answers {answer:.3g}/s < {MIN_COMPLETION_RATIO:.0%} of arrivals "
                  f"{arrival:.3g}/s: the queue grows")
    elif growth is not None and growth > MAX_TTFT_GROWTH:
        of = f" of class {cls}" if cls else ""
        reason = (f"TTFT p50{of} of the last third {last:.0f} ms > {MAX_TTFT_GROWTH:g}x the "
                  f"first third's {first:.0f} ms: the queue grows")
    return Steadiness(rate, arrival, answer, ratio, first, last, growth, cls, not reason,
                      reason)
