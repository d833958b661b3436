"""The load window the autoscaler reads: rates, lengths and attainment per SLO class over
the recent window, and the worst class's attainment as the pool signal."""

from __future__ import annotations

import pytest

from pdserve.router.load import LoadWindow


def test_attainment_is_per_class_and_the_worst_class_speaks_for_the_pool() -> None:
    w = LoadWindow(window_s=30.0)
    for i in range(4):
        w.arrived(100.0 + i, 10)
    w.finished(104.0, "interactive", 4, 14, True, True)
    w.finished(104.0, "interactive", 4, 14, False, True)
    w.finished(105.0, "standard", 6, 16, True, None)  # no TPOT objective: not judged
    w.finished(105.0, "best_effort", 8, 18, None, None)
    r = w.reading(106.0)
    assert r.ttft_by_class == {"interactive": 0.5, "standard": 1.0}
    assert r.tpot_by_class == {"interactive": 1.0}
    assert (r.ttft_attainment, r.tpot_attainment) == (0.5, 1.0)
    assert r.mean_output_tokens == 5.5 and r.mean_context_tokens == 15.5
    assert r.arrival_rate == pytest.approx(4 / 15.0)  # span at least half the window
    assert r.prompt_token_rate == pytest.approx(10 * r.arrival_rate)


def test_what_left_the_window_no_longer_counts() -> None:
    w = LoadWindow(window_s=10.0)
    w.finished(0.0, "standard", 4, 14, False, False)
    assert w.reading(5.0).ttft_attainment == 0.0
    r = w.reading(11.0)
    assert r.ttft_attainment is None and r.ttft_by_class == {} and r.mean_output_tokens == 0
