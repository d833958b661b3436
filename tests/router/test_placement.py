"""Placement and admission under the slo scheduler, on synthetic loads and a cost model
calibrated from a synthetic profile (prefill step 10 ms + 1 ms a token; decode step 20 ms +
1 ms a sequence; max_batch_tokens 100)."""

from __future__ import annotations

import math

import pytest

from pdserve.engine.sequence import SamplingParams
from pdserve.router.admission import TtftResidual, judge, predict_ttft
from pdserve.router.cost_model import CostModel, LinearFit, Profile, TransferFit
from pdserve.router.placement import Ask, Placer
from pdserve.router.policy import DecodeLoad, PrefillLoad
from pdserve.router.rates import Rate
from pdserve.router.request import Request
from pdserve.router.slo import ValidSlo
from pdserve_testing.detok import CharDetok

PROFILE = Profile(
    device="cpu", model="synthetic", dtype="float32", block_size=16, max_batch_tokens=100,
    kv_bytes_per_token=1000, prefill=LinearFit(0.010, 0.001, 0.0),
    decode=LinearFit(0.020, 0.001, 0.0), transfer=TransferFit(0.001, 1e6), samples={},
)


def placer(local: bool = True, seats: int = 8, clock: list[float] | None = None) -> Placer:
    """``clock``: a one-element list holding the router's time (the loads' step times)."""
    now = clock if clock is not None else [0.0]
    return Placer(CostModel(PROFILE), max_num_seqs=seats, block_size=16, local_prefill=local,
                  clock=lambda: now[0])


def free(name: str, running: int = 0, blocks: int = 1000) -> DecodeLoad:
    return DecodeLoad(name, num_running=running, num_free_blocks=blocks, known=True)


def test_predictions_follow_the_cost_model() -> None:
    pl = placer()
    p = PrefillLoad("p0", queued_tokens=150)
    # queue 150 + prompt 50 = 200 tokens: 2 steps of 100 -> 2 * 10 ms + 200 * 1 ms
    assert pl.remote_ttft_s(p, 50) == pytest.approx(0.22)
    d = free("d0", running=3)
    # joining makes a batch of 4: 20 ms + 4 ms
    assert pl.step_s(d, 50) == pytest.approx(0.024)


def test_the_worker_with_most_headroom_wins() -> None:
    pl = placer(local=False)
    ps = [PrefillLoad("p0", queued_tokens=400), PrefillLoad("p1")]
    ds = [free("d0", running=6), free("d1", running=1)]
    best = pl.options(Ask(50, ValidSlo(500, 100)), ps, ds, {})[0]
    assert (best.prefill, best.decode, best.feasible) == ("p1", "d1", True)


def test_a_full_decode_worker_is_never_offered() -> None:
    pl = placer(seats=2)
    ds = [free("d0", running=2), free("d1", blocks=3)]  # no seat; too few blocks for 50
    assert pl.options(Ask(50, ValidSlo(None, None)), [PrefillLoad("p0")], ds, {}) == []
    assert pl.has_room(free("d2", blocks=4), 50)  # 51 tokens: 4 blocks of 16
    assert pl.has_room(DecodeLoad("d3"), 50)  # not reported yet: its reserve decides


def test_harm_counts_the_running_tpot_objectives_a_placement_breaks() -> None:
    pl = placer(local=False)
    ds = [free("d0", running=5)]  # 25 ms a step now; joining: 26 ms
    held = {"d0": [0.020, 0.0255, 0.0258, 0.030]}  # two met now and broken by joining
    opts = pl.options(Ask(10, ValidSlo(None, None)), [PrefillLoad("p0")], ds, held)
    assert opts and opts[0].feasible and opts[0].harm == 2  # 20 ms is missed already
    opts = pl.options(Ask(10, ValidSlo(None, None)), [PrefillLoad("p0")], ds, {"d0": [0.03]})
    assert opts[0].harm == 0


def test_a_placement_that_harms_no_one_comes_first() -> None:
    pl = placer(local=False)
    ds = [free("d0", running=1), free("d1", running=5)]  # d0 has more headroom, but harms
    held = {"d0": [0.0215], "d1": [0.030]}
    best = pl.options(Ask(10, ValidSlo(None, 100)), [PrefillLoad("p0")], ds, held)[0]
    assert (best.decode, best.harm) == ("d1", 0)


def test_local_prefill_wins_when_the_prefill_worker_is_backed_up() -> None:
    pl = placer(local=True)
    ask = Ask(20, ValidSlo(300, 100))
    idle_p = [PrefillLoad("p0")]
    busy_p = [PrefillLoad("p0", queued_tokens=2000)]  # 2 s of queue
    ds = [free("d0", running=2)]
    assert pl.options(ask, idle_p, ds, {})[0].prefill == "p0"
    best = pl.options(ask, busy_p, ds, {})[0]
    assert best.prefill is None and best.feasible


def test_colocated_placement_is_local() -> None:
    pl = placer(local=True)
    opts = pl.options(Ask(20, ValidSlo(None, None)), [], [free("d0"), free("d1", 4)], {})
    assert [o.prefill for o in opts] == [None, None] and opts[0].decode == "d0"


def request(ttft_ms: float | None, n: int = 50, arrival: float = 0.0,
            best_effort: bool = False) -> Request:
    return Request("r", list(range(n)), SamplingParams(), (),
                   ValidSlo(ttft_ms, None, "c", 0, best_effort), arrival,
                   CharDetok())  # type: ignore[arg-type]


def test_admission_counts_the_queue_ahead_and_the_time_waited() -> None:
    pl = placer(local=False)
    ps, ds = [PrefillLoad("p0")], [free("d0")]
    alone = predict_ttft(pl, request(1000), [], ps, ds, 0.0, now=0.0)
    assert alone == pytest.approx(0.010 + 0.050)
    ahead = [request(1000, n=100), request(1000, n=50)]
    # 200 tokens: 2 steps -> 20 ms + 200 ms, after 0.1 s already waited
    assert predict_ttft(pl, request(1000, arrival=0.0), ahead, ps, ds, 0.0, now=0.1) == \
        pytest.approx(0.1 + 0.22)


def test_admission_predicts_the_placement_the_scheduler_takes_not_the_fastest() -> None:
    pl = placer(local=True)
    ps, ds = [PrefillLoad("p0", queued_tokens=200)], [free("d0", running=3)]
    req = Request("r", list(range(50)), SamplingParams(), (), ValidSlo(1000, 30, "c", 0),
                  0.0, CharDetok())  # type: ignore[arg-type]
    # Local prefill is sooner (what is left of D's 23 ms step, then a 73 ms mixed step)
    # but its 73 ms step misses the 30 ms TPOT objective: the request goes to p0, behind
    # 200 queued tokens (3 steps: 30 ms + 250 ms).
    assert pl.best_ttft_s(Ask(50, req.slo), ps, ds) == pytest.approx(0.023 + 0.073)
    assert predict_ttft(pl, req, [], ps, ds, 0.0, now=0.0) == pytest.approx(0.28)


def test_admission_waits_for_seats_at_the_finish_rate() -> None:
    pl = placer(local=False, seats=2)
    ds = [free("d0", running=2)]  # no seat free
    ahead = [request(None, n=1), request(None, n=1), request(None, n=1)]
    # 3 ahead + this one, 0 seats free: 4 finishes at 2 a second = 2 s, then its prefill
    got = predict_ttft(pl, request(5000), ahead, [PrefillLoad("p0")], ds, 2.0, now=0.0)
    assert got == pytest.approx(2.0 + 0.06)


def test_judge_refuses_naming_prediction_and_objective() -> None:
    v = judge(request(100), 0.25)
    assert "predicted TTFT 250 ms exceeds the objective 100 ms (SLO class c)" in v.refusal
    assert judge(request(300), 0.25).refusal == ""
    assert judge(request(100, best_effort=True), 0.25).refusal == ""
    assert judge(request(None), math.inf).refusal == ""


def test_rate_over_the_window() -> None:
    fr = Rate(window_s=10.0)
    assert fr.rate(0.0) == 0.0
    for t in range(20):
        fr.observe(t * 0.5)  # 2 a second
    assert fr.rate(10.0) == pytest.approx(2.0, rel=0.1)
    assert fr.rate(100.0) == 0.0  # all outside the window
    tokens = Rate(window_s=10.0)
    for t in range(10):
        tokens.observe(float(t), 64)
    assert tokens.rate(10.0) == pytest.approx(64.0)


def test_a_prompt_waits_for_the_step_in_progress_not_for_every_prompt_queued() -> None:
    now = [0.0]
    pl = placer(local=False, clock=now)
    p = PrefillLoad("p0")
    p.enqueue(90, now=0.0)  # reaches an idle worker: its step of 90 begins (0.1 s)
    assert (p.step_tokens, p.step_started) == (90, 0.0)
    now[0] = 0.05
    # 0.05 s left of that step, then a step of this prompt's 20 tokens alone (30 ms); a
    # queue of 90 + 20 tokens in steps of 100 would say 2 steps: 130 ms.
    assert pl.remote_ttft_s(p, 20) == pytest.approx(0.05 + 0.030)
    p.enqueue(30, now=0.05)  # joins the next step, not the running one
    assert p.step_tokens == 90
    # 120 tokens arrived, over at least half the 10 s window: 24 a second, so 1 token is
    # expected in the 0.05 s left; the next step holds 30 + 1 + 20.
    assert pl.remote_ttft_s(p, 20) == pytest.approx(0.05 + 0.061)
    now[0] = 0.1
    p.step_ended(90, now=0.1)  # before its prompt dequeues: the 30 make the next step
    p.dequeue(90)
    assert (p.step_tokens, p.step_started, p.queued_tokens) == (30, 0.1, 30)
    p.dequeue(30)  # aborted: the worker is idle
    assert p.step_tokens == 0
    assert pl.remote_ttft_s(p, 20) == pytest.approx(0.030)


def test_tokens_expected_during_the_wait_join_the_next_step() -> None:
    now = [0.0]
    pl = placer(local=False, clock=now)
    p = PrefillLoad("p0")
    for i in range(50):  # 10 tokens every 100 ms for 4.9 s
        now[0] = i * 0.1
        p.enqueue(10, now=now[0])
        p.step_ended(10, now=now[0])
        p.dequeue(10)
    p.enqueue(90, now=now[0])  # a step of 90 (0.1 s) begins
    quiet = pl.remote_ttft_s(PrefillLoad("p1"), 20)
    # 590 tokens over 5 s (half the window at least): 118 a second; in the 0.1 s left of
    # the step, 11 are expected and join this prompt's step (20 + 11 tokens)
    assert pl.remote_ttft_s(p, 20) == pytest.approx(0.1 + 0.010 + 0.031)
    assert quiet == pytest.approx(0.030)


def test_local_prefill_waits_for_the_decode_step_in_progress() -> None:
    now = [0.0]
    pl = placer(clock=now)
    d = free("d0")
    d.report(3, 0, 1000, 0.1, 0, now=1.0)  # 3 running: a step of 23 ms began at 1.0
    now[0] = 1.01
    # 13 ms left, then a mixed step of 3 sequences and 20 prompt tokens: 23 + 20 ms
    assert pl.local_ttft_s(d, 20) == pytest.approx(0.013 + 0.043)
    now[0] = 1.5  # the step overran the prediction: no wait left to add
    assert pl.local_ttft_s(d, 20) == pytest.approx(0.043)


def test_the_ttft_residual_learns_each_class_its_error() -> None:
    res = TtftResidual(alpha=0.5, half_life_s=1.0)
    assert res.get("c", 0.0) == 0.0
    res.observe("c", predicted_s=1.0, measured_s=3.0, now=0.0)  # 2 s late: half learned
    assert res.get("c", 0.0) == pytest.approx(1.0)
    res.observe("c", predicted_s=2.0, measured_s=3.0, now=0.0)  # 1 s left
    assert res.get("c", 0.0) == pytest.approx(1.5)
    res.observe("d", predicted_s=2.0, measured_s=1.0, now=0.0)  # over-predicted: negative
    assert res.get("d", 0.0) == pytest.approx(-0.5) and res.get("c", 0.0) == 1.5
    with pytest.raises(ValueError, match="alpha"):
        TtftResidual(alpha=0.0)


def test_the_ttft_residual_fades_once_its_class_is_refused() -> None:
    """A class refused for a learned residual sends no first tokens: it must not stay
    refused for good; while it is served, the residual holds between first tokens."""
    res = TtftResidual(alpha=1.0, half_life_s=2.0)
    res.observe("c", predicted_s=0.0, measured_s=8.0, now=10.0)
    assert res.get("c", 30.0) == pytest.approx(8.0)  # no refusal: no fade
    res.refused("c", now=30.0)
    res.refused("c", now=31.0)  # the fade runs from the first refusal
    assert res.get("c", 32.0) == pytest.approx(4.0)
    assert res.get("c", 40.0) == pytest.approx(0.25)
    res.observe("c", predicted_s=0.25, measured_s=0.5, now=40.0)  # from what is left
    assert res.get("c", 40.0) == pytest.approx(0.5)
    assert res.get("c", 60.0) == pytest.approx(0.5)  # served again: held


def test_tpot_spreads_the_prompt_chunks_a_decode_worker_prefills_over_its_steps() -> None:
    now = [10.0]
    pl = placer(clock=now)
    d = free("d0", running=3)
    assert pl.tpot_s(d, 10) == pytest.approx(0.024)  # no prompts reach d0: its decode step
    for i in range(20):  # 50 prompt tokens every 0.5 s: 100 a second over the 10 s window
        d.enqueue(50, now=i * 0.5)
        d.dequeue(50)
    # 1 ms a prompt token, 100 a second: a tenth of d0's time; 24 ms of decode -> 24 / 0.9
    assert pl.tpot_s(d, 10) == pytest.approx(0.024 / 0.9)
    # Prefilled there, this prompt's 50 tokens join the rate (5 more a second), not one
    # step: the step holding its chunk (24 + 50 ms) is one of the many it decodes in.
    assert pl.tpot_s(d, 10, 50) == pytest.approx(0.024 / (1 - 0.105))
    local = pl.options(Ask(10, ValidSlo(None, None)), [], [d], {})[0]  # colocated: local
    assert local.tpot_s == pytest.approx(0.024 / (1 - 0.101))  # its own 10 tokens join


def test_a_pair_whose_channel_is_being_reopened_is_not_offered() -> None:
    pl = placer(local=False)
    ps = [PrefillLoad("p0"), PrefillLoad("p1", queued_tokens=400)]
    ds = [free("d0"), free("d1", running=6)]
    opts = pl.options(Ask(50, ValidSlo(500, 100)), ps, ds, {},
                      usable=lambda p, d: (p, d) != ("p0", "d0"))
    assert opts and ("p0", "d0") not in {(o.prefill, o.decode) for o in opts}
    assert len(opts) == 3
