"""Unit tests of `pdserve bench`'s steady-state rules (no server, no clocks): how long each
rate runs, the warm-up cut, the steadiness check, and the floors that need --smoke."""

from __future__ import annotations

import math

import pytest

from pdserve.cluster.bench.config import BenchConfig
from pdserve.cluster.bench.records import RequestRecord, Slo
from pdserve.cluster.bench.report import make_report, report_goodput
from pdserve.cluster.bench.steady import (
    MAX_TTFT_GROWTH,
    MIN_COMPLETION_RATIO,
    Steadiness,
    arrival_window_s,
    counted_window,
    requests_for_rate,
    steadiness,
)
from pdserve.cluster.cli import main


def rec(i: int, send: float, ttft: float, e2e: float, status: str = "OK") -> RequestRecord:
    ok = status == "OK"
    chunks = ((send + ttft, 1), (send + e2e, 1)) if ok else ()
    return RequestRecord(index=i, max_tokens=2, send_s=send, end_s=send + (e2e if ok else 0.01),
                         chunks=chunks, prompt_tokens=4, output_tokens=2 if ok else 0, ok=ok,
                         status=status, error="" if ok else "refused")


def run(n: int, gap: float, ttft: float = 0.05, e2e: float = 0.5,
        grow: float = 0.0) -> list[RequestRecord]:
    """n requests `gap` s apart; TTFT and E2E rise by `grow` s per request (a queue)."""
    return [rec(i, i * gap, ttft + grow * i, e2e + grow * i) for i in range(n)]


# ---------------------------------------------------------------- window sizing


@pytest.mark.parametrize(("prev", "want"), [
    (None, 60.0),  # the first rate
    (2.0, 60.0),  # 10 x 2 s < 60 s
    (9.0, 90.0),  # 10 x 9 s
    (math.inf, 60.0),  # no lifetime known
])
def test_arrival_window_is_the_longer_of_the_floor_and_k_lifetimes(
        prev: float | None, want: float) -> None:
    assert arrival_window_s(60.0, 10.0, prev) == pytest.approx(want)


@pytest.mark.parametrize(("rate", "window", "least", "want"), [
    (1.0, 60.0, 500, 500),  # the floor of requests
    (16.0, 60.0, 500, 960),  # rate x window
    (0.55, 100.0, 1, 55),  # 55.00000000000001 is 55, not 56
    (2.5, 9.0, 1, 23),  # 22.5 rounds up
    (math.inf, 60.0, 500, 500),  # all at once: the floor
])
def test_requests_for_rate(rate: float, window: float, least: int, want: int) -> None:
    assert requests_for_rate(rate, window, least) == want


def test_floors_need_smoke_and_smoke_is_recorded() -> None:
    for kw, flag in (({"min_duration_s": 10}, "--min-duration-s"),
                     ({"duration_factor": 3}, "--duration-factor"),
                     ({"min_requests": 50}, "--min-requests"),
                     ({"warmup_fraction": 0.0}, "--warmup-fraction")):
        with pytest.raises(ValueError, match=f"{flag}.*--smoke"):
            BenchConfig(**kw)  # type: ignore[arg-type]
        assert not BenchConfig(smoke=True, **kw).steady_state  # type: ignore[arg-type]
    cfg = BenchConfig(min_duration_s=120, duration_factor=20, min_requests=1000)  # longer: fine
    assert cfg.steady_state
    with pytest.raises(ValueError, match="warmup-fraction"):
        BenchConfig(smoke=True, warmup_fraction=0.95)
    with pytest.raises(ValueError, match="min-duration-s"):
        BenchConfig(smoke=True, min_duration_s=0)


def test_cli_points_replaced_flags_at_their_replacement(
        capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--num-prompts", "--max-duration-s"):
        with pytest.raises(SystemExit) as e:
            main(["bench", flag, "100"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"{flag} was replaced" in err and "--smoke" in err
    assert main(["bench", "--min-requests", "5"]) == 2
    assert "--smoke" in capsys.readouterr().err


# ---------------------------------------------------------------- the warm-up cut


def test_warmup_cut_leaves_out_the_first_share_of_the_arrival_window() -> None:
    records = run(11, 1.0)  # sends at 0..10 s
    w = counted_window(records, 0.2)
    assert (w.first_s, w.cut_s, w.last_s) == (0.0, pytest.approx(2.0), 10.0)
    assert [r.index for r in w.counted] == list(range(2, 11))  # a send at the cut counts
    assert w.span_s == pytest.approx(8.0)
    assert len(counted_window(records, 0.0).counted) == 11
    assert counted_window([], 0.2).counted == ()


def test_report_counts_only_the_requests_after_the_warmup() -> None:
    """The first 20% of arrivals miss the TTFT objective (a ramp from idle); the rest meet it:
    attainment and goodput throughput over the counted window only, the totals over all."""
    records = [rec(i, float(i), 0.5 if i < 10 else 0.05, 0.6) for i in range(51)]
    rep = make_report("x", 1.0, 1.0, None, records, Slo(ttft_ms=100), warmup_fraction=0.2)
    assert rep.num_requests == 51 and rep.completed == 51
    assert rep.counted_requests == 41 and rep.window_s == pytest.approx(40.0)
    assert rep.attainment == 1.0
    assert rep.slo_goodput_throughput == pytest.approx(41 / 40)
    assert rep.ttft.count == 41 and rep.ttft.p99_ms == pytest.approx(50.0)
    assert rep.request_goodput == pytest.approx(41 / 50.6)  # vLLM's: all requests, duration
    full = make_report("x", 1.0, 1.0, None, records, Slo(ttft_ms=100), warmup_fraction=0.0)
    assert full.attainment == pytest.approx(41 / 51)


# ---------------------------------------------------------------- the steadiness check


def check(records: list[RequestRecord], rate: float = 1.0, warmup: float = 0.2) -> Steadiness:
    return steadiness(rate, records, counted_window(records, warmup))


def test_a_steady_run() -> None:
    s = check(run(100, 1.0))
    assert s.steady and s.reason == ""
    assert s.arrival_rate == pytest.approx(80 / 79.2)
    assert s.completion_ratio == pytest.approx(79 / 80)  # the last answer ends after the window
    assert s.ttft_p50_first_ms == pytest.approx(50.0) and s.ttft_growth == pytest.approx(1.0)


def test_answers_below_the_arrivals_mean_the_queue_grows() -> None:
    """The server answers one request every 1.25 s while they arrive every 1 s (80%)."""
    records = [rec(i, float(i), 0.05, 1.25 * i - i + 0.5) for i in range(100)]
    s = check(records)
    assert not s.steady and s.completion_ratio is not None
    assert s.completion_ratio < MIN_COMPLETION_RATIO
    assert "answers" in s.reason and "queue grows" in s.reason


def test_ttft_rising_over_the_window_means_the_queue_grows() -> None:
    """Answers keep pace (a queue that grows by 0.02 s a request still completes 98% inside
    the window), but TTFT of the last third is more than twice the first third's."""
    s = check(run(100, 1.0, ttft=0.05, e2e=0.1, grow=0.02))
    assert s.completion_ratio is not None and s.completion_ratio >= MIN_COMPLETION_RATIO
    assert s.ttft_growth is not None and s.ttft_growth > MAX_TTFT_GROWTH
    assert not s.steady and "TTFT p50 of the last third" in s.reason
    # growth at exactly the limit is still steady: the rule is "more than 2x"
    base = [rec(i, float(i), 0.1 if i < 60 else 0.2, 0.3) for i in range(100)]
    ok = check(base)
    assert ok.ttft_growth == pytest.approx(2.0) and ok.steady


def test_refusals_are_answers_but_timeouts_are_not() -> None:
    """A server that sheds load at admission keeps its queue bounded (steady; the refusals
    are misses in attainment); requests that the client gave up on are no answers."""
    refused = [rec(i, float(i), 0.05, 0.5, status="RESOURCE_EXHAUSTED" if i % 2 else "OK")
               for i in range(100)]
    s = check(refused)
    assert s.steady
    rep = make_report("x", 1.0, 1.0, None, refused, Slo(ttft_ms=100), warmup_fraction=0.2)
    assert rep.attainment == pytest.approx(0.5) and rep.failures == {"RESOURCE_EXHAUSTED": 50}
    timed_out = [rec(i, float(i), 0.05, 0.5, status="DEADLINE_EXCEEDED" if i % 2 else "OK")
                 for i in range(100)]
    assert not check(timed_out).steady


def test_a_burst_or_too_few_requests_is_never_steady() -> None:
    burst = [rec(i, 0.0, 0.05, 0.5) for i in range(50)]
    s = check(burst, rate=math.inf)
    assert not s.steady and "burst" in s.reason
    assert s.arrival_rate is None and s.completion_ratio is None
    assert not check(run(2, 1.0)).steady
    assert "too few" in check(run(2, 1.0)).reason
    # a burst has no warm-up to cut: every request counts, per second of the whole run
    rep = make_report("x", math.inf, 1.0, None, burst, Slo(ttft_ms=100), warmup_fraction=0.2)
    assert rep.counted_requests == 50 and rep.warmup_fraction == 0.0
    assert rep.window_s == pytest.approx(0.5)
    assert rep.slo_goodput_throughput == pytest.approx(100.0)


def test_a_rate_that_is_not_steady_misses_goodput() -> None:
    slo = Slo(ttft_ms=60_000)  # every request meets it: only steadiness decides
    reps = [make_report("x", 1.0, 1.0, None, run(100, 1.0), slo, 0.2),
            make_report("x", 2.0, 1.0, None, run(100, 0.5, grow=0.3), slo, 0.2),
            make_report("x", 4.0, 1.0, None, run(100, 0.25), slo, 0.2)]
    assert [r.attainment for r in reps] == [1.0, 1.0, 1.0]
    assert [r.steady for r in reps] == [True, False, True]
    g = report_goodput(reps, 0.9)
    assert g.rate == 4.0 and not g.bracketed  # the highest steady rate that met the target
    g = report_goodput(reps[:2], 0.9)
    assert g.rate == 1.0 and g.bracketed and "not steady" in g.note
    g = report_goodput(reps[1:2], 0.9)
    assert g.rate is None and "not steady" in g.note


def test_ttft_growth_is_judged_per_slo_class() -> None:
    """A 50/50 mix of 50 ms and 2 s TTFTs whose median would jump between the classes with
    each third's share is steady; one class whose TTFT grows (best effort behind priority)
    is not, whatever the other does."""
    from dataclasses import replace

    mix = [replace(rec(i, float(i), 0.05 if cls == "i" else 2.0, 2.5), slo_class=cls)
           for i, cls in enumerate(["i"] * 20 + ["b"] * 20 + ["i", "b"] * 10 + ["b"] * 20
                                   + ["i"] * 20)]
    s = check(mix)
    assert s.steady and s.ttft_growth == pytest.approx(1.0)
    grows = [replace(rec(i, float(i), 0.05 if i % 2 else 0.5 + 0.05 * i, 3.0 + 0.05 * i),
                     slo_class="i" if i % 2 else "b") for i in range(120)]
    s = check(grows)
    assert not s.steady and s.ttft_class == "b" and "of class b" in s.reason
