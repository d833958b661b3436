"""What the Router records in its metrics as requests run against fake workers (no Ray):
goodput and attainment per SLO class, aborts never attained, the per-request KV transfer
and first decode step, predicted-vs-actual TTFT and TPOT, failures by status code.

Latencies that a test judges are made long by moving a request's clock readings back (its
arrival, its first token), never by waiting."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.engine.messages import StepReport, TokenOut, TransferDone
from pdserve.router.cost_model import LinearFit, Profile, TransferFit
from pdserve.router.policy import LocalPrefillRule
from pdserve.router.request import Request, State
from pdserve.router.router import deadline_callback
from pdserve.router.slo import ValidSlo
from pdserve_testing.router import RouterSetup, settle

GENEROUS = 3_600_000.0  # ms: an hour, met by any request here
# Prefill step 10 ms + 1 ms a token; decode step 20 ms + 1 ms a sequence.
PROFILE = Profile(
    device="cpu", model="synthetic", dtype="float32", block_size=16, max_batch_tokens=100,
    kv_bytes_per_token=1000, prefill=LinearFit(0.010, 0.001, 0.0),
    decode=LinearFit(0.020, 0.001, 0.0), transfer=TransferFit(0.001, 1e6), samples={},
)


def slo(cls: str = "default", ttft_ms: float | None = GENEROUS,
        tpot_ms: float | None = GENEROUS) -> ValidSlo:
    return ValidSlo(ttft_ms, tpot_ms, cls)


def decode(s: RouterSetup, req: Request, token: int = 66, finish: str | None = None) -> None:
    """One decode step of ``req`` on its decode worker."""
    assert req.lease is not None
    s.router.on_step(StepReport(
        "decode-0", tokens=[TokenOut(req.request_id, req.lease.transfer_id, token, finish)],
        num_running=1, num_free_blocks=100))


def transfer_done(s: RouterSetup, req: Request, seconds: float, tid: int | None = None,
                  ok: bool = True) -> None:
    """The prefill worker's report of ``req``'s transfer (by default its current one's)."""
    if tid is None:
        assert req.lease is not None
        tid = req.lease.transfer_id
    s.router.on_transfer_done(TransferDone("prefill-0", req.request_id, tid, ok, seconds,
                                           1000 if ok else 0, "" if ok else "broke"))


# -- goodput and attainment ------------------------------------------------------------------

def test_every_class_has_zero_series_from_the_start() -> None:
    s = RouterSetup(slo_classes=("interactive", "batch"))
    for cls in ("interactive", "batch"):
        assert s.value("pdserve:goodput_requests_total", slo_class=cls) == 0
        for phase in ("ttft", "tpot"):
            assert s.value("pdserve:slo_attained_total", slo_class=cls, phase=phase) == 0
            assert s.value("pdserve:slo_violated_total", slo_class=cls, phase=phase) == 0


def test_goodput_and_attainment_per_class_and_phase() -> None:
    async def main() -> None:
        s = RouterSetup(slo_classes=("interactive", "batch"))
        good = await s.admit("good", 4, slo("interactive"))
        s.first_token("prefill-0", good)
        decode(s, good)
        decode(s, good, finish="length")
        assert good.state == State.FINISHED

        late = await s.admit("late", 4, slo("interactive", ttft_ms=1000.0))
        late.arrival -= 10.0  # TTFT over 10 s against 1 s
        s.first_token("prefill-0", late)
        decode(s, late, finish="stop")

        slow = await s.admit("slow", 4, slo("batch", ttft_ms=None, tpot_ms=100.0))
        s.first_token("prefill-0", slow)
        slow.t_first -= 10.0  # 10 s over 2 tokens after the first: TPOT 5 s against 0.1 s
        decode(s, slow)
        decode(s, slow, finish="length")

        def attained(cls: str, phase: str) -> float:
            return s.value("pdserve:slo_attained_total", slo_class=cls, phase=phase)

        def violated(cls: str, phase: str) -> float:
            return s.value("pdserve:slo_violated_total", slo_class=cls, phase=phase)

        assert s.value("pdserve:goodput_requests_total", slo_class="interactive") == 1
        assert s.value("pdserve:goodput_requests_total", slo_class="batch") == 0
        assert (attained("interactive", "ttft"), violated("interactive", "ttft")) == (1, 1)
        assert (attained("interactive", "tpot"), violated("interactive", "tpot")) == (2, 0)
        assert (attained("batch", "tpot"), violated("batch", "tpot")) == (0, 1)
        assert (attained("batch", "ttft"), violated("batch", "ttft")) == (0, 0)  # no objective
        assert s.value("pdserve:request_success_total", finished_reason="length") == 2
        assert s.value("pdserve:request_success_total", finished_reason="stop") == 1

    asyncio.run(main())


def test_a_missing_phase_counts_as_met_and_no_objective_is_not_goodput() -> None:
    async def main() -> None:
        s = RouterSetup()
        # A TPOT objective and a one-token answer: nothing missed, goodput.
        one = await s.admit("one", 4, slo(ttft_ms=None, tpot_ms=50.0))
        s.first_token("prefill-0", one, finish_reason="length")
        assert one.state == State.FINISHED
        assert s.value("pdserve:goodput_requests_total", slo_class="default") == 1
        assert s.value("pdserve:slo_attained_total", slo_class="default", phase="tpot") == 0
        # No objective at all: throughput, not goodput.
        free = await s.admit("free", 4)
        s.first_token("prefill-0", free)
        decode(s, free, finish="stop")
        assert free.state == State.FINISHED
        assert s.value("pdserve:goodput_requests_total", slo_class="default") == 1
        assert s.value("pdserve:request_success_total", finished_reason="stop") == 1

    asyncio.run(main())


@pytest.mark.parametrize("end", ["abort", "client_gone", "deadline"])
def test_a_request_that_did_not_finish_is_never_attained(end: str) -> None:
    """Its first token came well within the objective, but it did not finish: judged in
    neither attained nor violated, not goodput."""
    async def main() -> None:
        s = RouterSetup()
        req = await s.admit("r", 4, slo())
        s.first_token("prefill-0", req)
        decode(s, req)
        if end == "abort":
            assert s.router.abort("r")
            assert s.value("pdserve:request_success_total", finished_reason="abort") == 1
        elif end == "client_gone":
            assert s.router.client_gone("r", "CANCELLED")
            assert s.value("pdserve:request_failure_total", code="CANCELLED") == 1
            assert not s.out[-1][1].finish_reason  # nothing sent: the stream is gone
        else:
            deadline_callback(s.router, req)()
            assert s.value("pdserve:request_failure_total", code="DEADLINE_EXCEEDED") == 1
        assert req.done
        for phase in ("ttft", "tpot"):
            assert s.value("pdserve:slo_attained_total", slo_class="default", phase=phase) == 0
            assert s.value("pdserve:slo_violated_total", slo_class="default", phase=phase) == 0
        assert s.value("pdserve:goodput_requests_total", slo_class="default") == 0

    asyncio.run(main())


# -- the TTFT split ----------------------------------------------------------------------------

def test_the_kv_transfer_of_a_request_is_observed_once() -> None:
    async def main() -> None:
        s = RouterSetup()
        req = await s.admit("r", 9)
        s.first_token("prefill-0", req)
        transfer_done(s, req, 0.25)
        assert s.value("pdserve:request_kv_transfer_time_seconds_count") == 1
        assert s.value("pdserve:request_kv_transfer_time_seconds_sum") == 0.25
        # Preempted: the recompute's transfer is a transfer, not the request's again.
        s.router.on_step(StepReport("decode-0", preempted=["r"], num_free_blocks=100))
        await settle()
        assert req.attempts == 2 and req.prefill_worker == "prefill-0"
        s.first_token("prefill-0", req)
        transfer_done(s, req, 0.5)
        assert s.value("pdserve:request_kv_transfer_time_seconds_count") == 1
        assert s.value("pdserve:kv_transfer_seconds_count") == 2  # every transfer
        assert req.transfer_s == 0.75  # the final timing's kv_transfer_s: every attempt

    asyncio.run(main())


def test_a_transfer_reported_after_its_request_ended_is_observed() -> None:
    """The decode worker can finish a short answer before the prefill worker reports that
    the KV left."""
    async def main() -> None:
        s = RouterSetup()
        req = await s.admit("r", 9)
        assert req.lease is not None
        tid = req.lease.transfer_id
        s.first_token("prefill-0", req)
        decode(s, req, finish="length")
        assert req.state == State.FINISHED
        # A new request with the same id is in flight when the old one's report lands.
        again = await s.admit("r", 9)
        transfer_done(s, req, 0.125, tid=tid)
        assert s.value("pdserve:request_kv_transfer_time_seconds_count") == 1
        assert s.value("pdserve:request_kv_transfer_time_seconds_sum") == 0.125
        assert not again.transfer_observed
        transfer_done(s, req, 0.125, tid=tid)  # counted once only
        assert s.value("pdserve:request_kv_transfer_time_seconds_count") == 1
        # A failed transfer is not a transfer time.
        s.first_token("prefill-0", again)
        transfer_done(s, again, 0.0, ok=False)
        assert s.value("pdserve:request_kv_transfer_time_seconds_count") == 1

    asyncio.run(main())


def test_a_local_prefill_has_no_transfer() -> None:
    async def main() -> None:
        s = RouterSetup(LocalPrefillRule(local_prefill_max_tokens=8))
        req = await s.admit("r", 4)
        assert req.prefill_worker == ""
        s.first_token("decode-0", req)
        decode(s, req, finish="length")
        assert s.value("pdserve:request_kv_transfer_time_seconds_count") == 0
        assert s.value("pdserve:request_first_decode_step_seconds_count") == 1

    asyncio.run(main())


def test_the_first_decode_step_is_the_time_from_the_first_token_to_the_second() -> None:
    async def main() -> None:
        s = RouterSetup()
        req = await s.admit("r", 4)
        s.first_token("prefill-0", req)
        req.t_first -= 0.3  # the second token comes at least 0.3 s after the first
        decode(s, req)
        decode(s, req)
        decode(s, req, finish="length")
        assert s.value("pdserve:request_first_decode_step_seconds_count") == 1
        assert s.value("pdserve:request_first_decode_step_seconds_bucket", le="0.25") == 0
        assert s.value("pdserve:request_first_decode_step_seconds_sum") >= 0.3
        # One token only: no second token, nothing observed.
        one = await s.admit("one", 4)
        s.first_token("prefill-0", one, finish_reason="length")
        assert one.done
        # A decode step reported before the prefill worker's first token still counts once.
        early = await s.admit("early", 4)
        decode(s, early)
        s.first_token("prefill-0", early)
        decode(s, early, finish="length")
        assert early.output_ids == [65, 66, 66]
        assert s.value("pdserve:request_first_decode_step_seconds_count") == 2

    asyncio.run(main())


# -- predictions -------------------------------------------------------------------------------

def test_predicted_ttft_and_tpot_are_compared_with_the_actual_ones_at_finish() -> None:
    async def main() -> None:
        s = RouterSetup(profile=PROFILE)
        req = await s.admit("r", 20, slo())
        pred_ttft, pred_tpot = req.predicted_ttft_s, req.predicted_tpot_s
        assert pred_ttft is not None and pred_ttft > 0
        assert pred_tpot is not None and pred_tpot > 0
        s.first_token("prefill-0", req)
        req.t_first -= 2.0  # TPOT about 1 s
        req.arrival = req.t_first - 2.5 * pred_ttft  # TTFT 2.5 times the predicted
        decode(s, req)
        decode(s, req, finish="length")
        ttft = req.t_first - req.arrival
        tpot = (req.t_last - req.t_first) / 2
        for phase, pred, actual in (("ttft", pred_ttft, ttft), ("tpot", pred_tpot, tpot)):
            assert s.value(f"pdserve:{phase}_prediction_ratio_count") == 1
            assert s.value(f"pdserve:{phase}_prediction_ratio_sum") == \
                pytest.approx(actual / pred)
            assert s.value(f"pdserve:{phase}_prediction_relative_error_sum") == \
                pytest.approx(abs(pred - actual) / actual)
        assert s.value("pdserve:ttft_prediction_ratio_bucket", le="2.0") == 0
        assert s.value("pdserve:ttft_prediction_ratio_bucket", le="3.0") == 1

    asyncio.run(main())


def test_no_prediction_no_observation() -> None:
    async def main() -> None:
        s = RouterSetup()  # no profile: the cost model is not calibrated, predicts nothing
        req = await s.admit("r", 4, slo())
        assert req.predicted_ttft_s is None and req.predicted_tpot_s is None
        s.first_token("prefill-0", req)
        decode(s, req)
        decode(s, req, finish="length")
        for phase in ("ttft", "tpot"):
            assert s.value(f"pdserve:{phase}_prediction_ratio_count") == 0
            assert s.value(f"pdserve:{phase}_prediction_relative_error_count") == 0

    asyncio.run(main())


# -- failures ----------------------------------------------------------------------------------

def test_failures_are_counted_once_by_code() -> None:
    async def main() -> None:
        s = RouterSetup(max_attempts=1)
        broken = await s.admit("broken", 4)
        transfer_done(s, broken, 0.0, ok=False)  # the only attempt failed
        assert broken.state == State.FAILED
        gone = await s.admit("gone", 4)
        assert gone.lease is not None
        assert s.router.client_gone("gone", "CANCELLED")
        assert not s.router.client_gone("gone", "CANCELLED")  # ended already: not again
        assert not s.router.abort("gone")
        assert ("gone", gone.lease.transfer_id) in s.d.called("abort")  # its work freed
        late = await s.admit("late", 4)
        deadline_callback(s.router, late)()
        assert not s.router.client_gone("late", "DEADLINE_EXCEEDED")  # the frontend's view
        await s.admit("shutdown", 4)
        s.router.abort_all("the server is shutting down")
        assert s.value("pdserve:request_failure_total", code="UNAVAILABLE") == 2
        assert s.value("pdserve:request_failure_total", code="CANCELLED") == 1
        assert s.value("pdserve:request_failure_total", code="DEADLINE_EXCEEDED") == 1
        # Failures are not finishes: no latency or token counts for them.
        assert s.value("pdserve:e2e_request_latency_seconds_count") == 0
        assert s.metrics.registry.get_sample_value(
            "pdserve:request_success_total", {"finished_reason": "abort"}) is None

    asyncio.run(main())
