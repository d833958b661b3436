"""Unit tests of how `pdserve bench` walks a sweep (no server): the ascending order and early
stop of --stop-below-attainment (also at a rate that is not steady), and the sweep loop itself
driven through a fake client, its windows sized from the previous steady rate, down to the
JSON it writes."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import pdserve.cluster.bench.serve as bench
from pdserve.cluster.bench.config import BenchConfig
from pdserve.cluster.bench.data import Prompt
from pdserve.cluster.bench.records import RequestRecord, Slo
from pdserve.cluster.bench.serve import run_bench, sweep_order, sweep_stop
from pdserve.cluster.cli import main
from pdserve.proto import pdserve_pb2 as pb

SLO = Slo(ttft_ms=100.0)


def walk(rates: Sequence[float], attainment: dict[float, float],
         threshold: float | None) -> tuple[list[float], tuple[float, ...], str | None]:
    """The sweep loop's decisions on made-up attainments: (rates run, skipped, reason)."""
    cfg = BenchConfig(request_rates=tuple(rates), slo=SLO, stop_below_attainment=threshold)
    order = sweep_order(cfg)
    ran: list[float] = []
    for rate in order:
        ran.append(rate)
        stop = sweep_stop(order, [attainment[r] for r in ran], threshold)
        if stop is not None:
            return ran, stop.skipped_rates, stop.reason
    return ran, (), None


# ---------------------------------------------------------------- order and early stop


def test_stop_after_first_rate_below_threshold_in_ascending_order() -> None:
    att = {1.0: 1.0, 2.0: 0.95, 4.0: 0.6, 3.0: 0.85, 8.0: 0.99}
    ran, skipped, reason = walk([4, 1, 8, 3, 2], att, 0.9)
    assert ran == [1.0, 2.0, 3.0]  # ascending, and 3 is the first below 0.9
    assert skipped == (4.0, 8.0)  # even though 8 would have passed
    assert reason is not None and "85.0%" in reason and "3 req/s" in reason


def test_no_stop_without_threshold_keeps_given_order() -> None:
    att = {4.0: 0.1, 1.0: 0.1, 2.0: 0.1}
    assert walk([4, 1, 2], att, None) == ([4.0, 1.0, 2.0], (), None)


def test_exact_threshold_passes_and_last_rate_missing_is_no_early_stop() -> None:
    att = {1.0: 0.9, 2.0: 0.9, 3.0: 0.2}
    assert walk([1, 2, 3], att, 0.9) == ([1.0, 2.0, 3.0], (), None)


def test_first_rate_missing_skips_all_others_including_inf() -> None:
    att = {0.5: 0.0, 1.0: 1.0, math.inf: 1.0}
    ran, skipped, reason = walk([math.inf, 1, 0.5], att, 0.5)
    assert ran == [0.5] and skipped == (1.0, math.inf) and reason is not None


def test_a_rate_that_is_not_steady_stops_the_sweep() -> None:
    order = (1.0, 2.0, 4.0)
    assert sweep_stop(order, [1.0], 0.9, [""]) is None
    stop = sweep_stop(order, [1.0, 0.97], 0.9, ["", "answers 1.5/s < 90% of arrivals 2/s"])
    assert stop is not None and stop.skipped_rates == (4.0,)
    assert "2 req/s not steady (answers 1.5/s" in stop.reason
    # below the threshold and not steady: the attainment is the reason given
    stop = sweep_stop(order, [0.5], 0.9, ["the queue grows"])
    assert stop is not None and "50.0% at 1 req/s" in stop.reason
    assert sweep_stop(order, [1.0], None, ["the queue grows"]) is None  # no threshold: no stop


def test_config_validation_of_the_new_flags() -> None:
    with pytest.raises(ValueError, match="needs an SLO"):
        BenchConfig(stop_below_attainment=0.9)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="stop-below-attainment"):
            BenchConfig(stop_below_attainment=bad, slo=SLO)
    BenchConfig(stop_below_attainment=1.0, slo=Slo(tpot_ms=40))  # one objective is enough
    BenchConfig(stop_below_attainment=0.9, slo_class="interactive")  # or a class's


def test_cli_rejects_stop_flag_without_slo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "--request-rate", "1,2", "--stop-below-attainment", "0.9"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--stop-below-attainment" in err and "--slo-ttft-ms" in err
    for flags in (["--stop-below-attainment", "0"], ["--min-duration-s", "-1"]):
        with pytest.raises(SystemExit):
            main(["bench", "--slo-ttft-ms", "100", *flags])
        assert flags[0] in capsys.readouterr().err


# ---------------------------------------------------------------- the loop, with a fake client


class FakeClient:
    """Stands in for AsyncClient: serves model info; run_rate is faked separately."""

    def __init__(self, server: str, *, own_connection: bool = False,
                 auth: object = None) -> None:
        self.server = server

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> FakeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def wait_ready(self, timeout: float) -> None:
        return None

    async def model_info(self, timeout: float) -> pb.ModelInfo:
        return pb.ModelInfo(model_name="fake", vocab_size=100, max_context_length=64)

    async def server_info(self, timeout: float) -> pb.ServerInfo:
        return pb.ServerInfo(mode="colocated", scheduler="fifo", version="test")


def spread(i: int, share: float) -> bool:
    """Whether request i is one of a `share` of requests spread evenly over the run."""
    return math.floor((i + 1) * share + 1e-9) > math.floor(i * share + 1e-9)


def fake_records(n: int, attainment: float) -> list[RequestRecord]:
    """n completed requests, 1 s apart, E2E 0.6 s, of which about n * attainment, spread
    evenly over the run (so TTFT p50 is alike in every third), meet the SLO (TTFT 50 vs
    500 ms)."""
    return [RequestRecord(index=i, max_tokens=2, send_s=float(i), end_s=i + 0.6,
                          chunks=((i + (0.05 if spread(i, attainment) else 0.5), 1),
                                  (i + 0.6, 1)),
                          prompt_tokens=4, output_tokens=2, ok=True, finish_reason="length")
            for i in range(n)]


def test_sweep_loop_sizes_windows_stops_and_records_skips(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    attainment = {1.0: 1.0, 2.0: 0.95, 4.0: 0.5, 8.0: 1.0}
    sent: list[tuple[float, int]] = []

    async def fake_run_rate(client: Any, cfg: BenchConfig, prompts: list[Prompt],
                            rate: float, procs: Any = None) -> list[RequestRecord]:
        assert procs is None  # one client process unless asked for more
        sent.append((rate, len(prompts)))
        assert [p.slo_class for p in prompts] == [""] * len(prompts)  # no classes served
        return fake_records(len(prompts), attainment[rate])

    monkeypatch.setattr(bench, "AsyncClient", FakeClient)
    monkeypatch.setattr(bench, "run_rate", fake_run_rate)
    out = tmp_path / "r.json"
    cfg = BenchConfig(input_len=4, output_len=2, request_rates=(8, 2, 4, 1), slo=SLO,
                      stop_below_attainment=0.9, smoke=True, min_requests=20,
                      min_duration_s=15.0, duration_factor=40.0, warmup_fraction=0.0,
                      result_json=str(out), progress=False)
    result = run_bench(cfg)
    # ascending; 1 req/s * 15 s is raised to the floor of 20; then the window is 40 x the
    # previous median E2E of 0.6 s = 24 s: 2 * 24 = 48, 4 * 24 = 96
    assert sent == [(1.0, 20), (2.0, 48), (4.0, 96)]
    assert result.config.request_rates == (1.0, 2.0, 4.0, 8.0)
    assert [r.attainment for r in result.reports] == pytest.approx([1.0, 45 / 48, 0.5])
    assert all(r.steady for r in result.reports[:2])
    # goodput over the rates that ran: 2 passed, 4 missed, so bracketed despite 8 skipped
    assert result.goodput.rate == 2.0 and result.goodput.bracketed
    printed = capsys.readouterr().out
    stop_lines = [line for line in printed.splitlines() if line.startswith("Stopped early")]
    assert len(stop_lines) == 1 and "skipped 8 req/s" in stop_lines[0]
    assert "scheduler fifo, mode colocated" in printed and "NOT steady state" in printed
    data = json.loads(out.read_text())
    assert data["skipped_rates"] == [8.0]
    assert "50.0% at 4 req/s" in data["stopped_early"]
    assert [run["report"]["num_requests"] for run in data["runs"]] == [20, 48, 96]
    assert [len(run["requests"]) for run in data["runs"]] == [20, 48, 96]
    assert [run["arrival_window_s"] for run in data["runs"]] == pytest.approx([15, 24, 24])
    assert data["config"]["stop_below_attainment"] == 0.9
    assert data["config"]["min_duration_s"] == 15.0 and data["config"]["smoke"] is True
    assert data["steady_state"] is False
    assert data["server"]["scheduler"] == "fifo" and data["server"]["mode"] == "colocated"
    assert data["goodput"]["rate"] == 2.0
    steadiness = data["runs"][0]["report"]["steadiness"]
    assert steadiness["steady"] is True and steadiness["reason"] == ""
    assert steadiness["completion_ratio"] == pytest.approx(1.0, abs=0.1)

    # every rate passing: nothing skipped, no stop recorded
    sent.clear()
    attainment[4.0] = 0.92
    result = run_bench(cfg)
    assert [r for r, _ in sent] == [1.0, 2.0, 4.0, 8.0]
    data = json.loads(out.read_text())
    assert data["skipped_rates"] == [] and data["stopped_early"] is None
    assert "Stopped early" not in capsys.readouterr().out
    assert result.goodput.rate == 8.0 and not result.goodput.bracketed


def test_a_window_follows_the_last_steady_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rate that is not steady leaves the next window sized by the last steady one."""
    sent: list[tuple[float, int]] = []

    def growing(n: int) -> list[RequestRecord]:  # each answer later than the one before
        return [RequestRecord(index=i, max_tokens=2, send_s=float(i), end_s=1.5 * i + 3,
                              chunks=((1.5 * i + 2, 1), (1.5 * i + 3, 1)), prompt_tokens=4,
                              output_tokens=2, ok=True) for i in range(n)]

    async def fake_run_rate(client: Any, cfg: BenchConfig, prompts: list[Prompt],
                            rate: float, procs: Any = None) -> list[RequestRecord]:
        sent.append((rate, len(prompts)))
        return fake_records(len(prompts), 1.0) if rate == 1 else growing(len(prompts))

    monkeypatch.setattr(bench, "AsyncClient", FakeClient)
    monkeypatch.setattr(bench, "run_rate", fake_run_rate)
    cfg = BenchConfig(request_rates=(1, 2, 3), slo=SLO, smoke=True, min_requests=20,
                      min_duration_s=1.0, duration_factor=50.0, progress=False)
    result = run_bench(cfg)
    assert [r.steady for r in result.reports] == [True, False, False]
    # 50 x 0.6 s after rate 1; rate 2's median E2E (its queue) does not size rate 3's
    assert sent == [(1.0, 20), (2.0, 60), (3.0, 90)]
    assert result.goodput.rate == 1.0 and result.goodput.bracketed
