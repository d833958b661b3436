"""Unit tests of how `pdserve bench` walks a sweep (no server): the ascending order and early
stop of --stop-below-attainment, the prompt count per rate of --max-duration-s, and the sweep
loop itself driven through a fake client, down to the JSON it writes."""

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
from pdserve.cluster.bench.serve import (
    MIN_PROMPTS_PER_RATE,
    prompts_for_rate,
    run_bench,
    sweep_order,
    sweep_stop,
)
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


# ---------------------------------------------------------------- prompts per rate


@pytest.mark.parametrize(("num", "rate", "dur", "want"), [
    (100, 4.0, None, 100),  # no cap
    (100, 1.0, 60.0, 60),  # rate * D
    (100, 4.0, 60.0, 100),  # capped by --num-prompts
    (100, 0.5, 10.0, MIN_PROMPTS_PER_RATE),  # 5, raised to the floor
    (12, 0.5, 10.0, 12),  # the floor never exceeds --num-prompts
    (100, 0.55, 100.0, 55),  # 55.00000000000001 is 55, not 56
    (200, 1.1, 90.0, 99),  # 99.00000000000001 is 99
    (100, 2.5, 9.0, 23),  # 22.5 rounds up
    (100, math.inf, 5.0, 100),  # all at once: every prompt
])
def test_prompts_for_rate(num: int, rate: float, dur: float | None, want: int) -> None:
    assert prompts_for_rate(num, rate, dur) == want


def test_config_validation_of_the_new_flags() -> None:
    with pytest.raises(ValueError, match="needs an SLO"):
        BenchConfig(stop_below_attainment=0.9)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="stop-below-attainment"):
            BenchConfig(stop_below_attainment=bad, slo=SLO)
    BenchConfig(stop_below_attainment=1.0, slo=Slo(tpot_ms=40))  # one objective is enough
    with pytest.raises(ValueError, match="max-duration-s"):
        BenchConfig(max_duration_s=0)


def test_cli_rejects_stop_flag_without_slo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "--request-rate", "1,2", "--stop-below-attainment", "0.9"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--stop-below-attainment" in err and "--slo-ttft-ms" in err
    for flags in (["--stop-below-attainment", "0"], ["--max-duration-s", "-1"]):
        with pytest.raises(SystemExit):
            main(["bench", "--slo-ttft-ms", "100", *flags])
        assert flags[0] in capsys.readouterr().err


# ---------------------------------------------------------------- the loop, with a fake client


class FakeClient:
    """Stands in for AsyncClient: serves model info; run_rate is faked separately."""

    def __init__(self, server: str, *, own_connection: bool = False) -> None:
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


def fake_records(n: int, attainment: float) -> list[RequestRecord]:
    """n completed requests of which round(n * attainment) meet SLO (TTFT 50 vs 500 ms)."""
    meet = round(n * attainment)
    return [RequestRecord(index=i, max_tokens=2, send_s=0.1 * i, end_s=0.1 * i + 0.6,
                          chunks=((0.1 * i + (0.05 if i < meet else 0.5), 1),
                                  (0.1 * i + 0.6, 1)),
                          prompt_tokens=4, output_tokens=2, ok=True, finish_reason="length")
            for i in range(n)]


def test_sweep_loop_stops_caps_prompts_and_records_skips(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    attainment = {1.0: 1.0, 2.0: 0.95, 4.0: 0.5, 8.0: 1.0}
    sent: list[tuple[float, int]] = []

    async def fake_run_rate(client: Any, cfg: BenchConfig, prompts: list[Prompt],
                            rate: float, procs: Any = None) -> list[RequestRecord]:
        assert procs is None  # one client process unless asked for more
        sent.append((rate, len(prompts)))
        return fake_records(len(prompts), attainment[rate])

    monkeypatch.setattr(bench, "AsyncClient", FakeClient)
    monkeypatch.setattr(bench, "run_rate", fake_run_rate)
    out = tmp_path / "r.json"
    cfg = BenchConfig(num_prompts=40, input_len=4, output_len=2, request_rates=(8, 2, 4, 1),
                      slo=SLO, stop_below_attainment=0.9, max_duration_s=15.0,
                      result_json=str(out), progress=False)
    result = run_bench(cfg)
    # ascending; 1 req/s * 15 s is raised to the floor of 20, 2 * 15 = 30, 4 * 15 = 60 > 40
    assert sent == [(1.0, 20), (2.0, 30), (4.0, 40)]
    assert result.config.request_rates == (1.0, 2.0, 4.0, 8.0)
    assert [r.attainment for r in result.reports] == pytest.approx([1.0, 28 / 30, 0.5])
    # goodput over the rates that ran: 2 passed, 4 missed, so bracketed despite 8 skipped
    assert result.goodput.rate == 2.0 and result.goodput.bracketed
    printed = capsys.readouterr().out
    stop_lines = [line for line in printed.splitlines() if line.startswith("Stopped early")]
    assert len(stop_lines) == 1 and "skipped 8 req/s" in stop_lines[0]
    data = json.loads(out.read_text())
    assert data["skipped_rates"] == [8.0]
    assert "50.0% at 4 req/s" in data["stopped_early"]
    assert [run["report"]["num_requests"] for run in data["runs"]] == [20, 30, 40]
    assert [len(run["requests"]) for run in data["runs"]] == [20, 30, 40]
    assert data["config"]["stop_below_attainment"] == 0.9
    assert data["config"]["max_duration_s"] == 15.0
    assert data["goodput"]["rate"] == 2.0

    # every rate passing: nothing skipped, no stop recorded
    sent.clear()
    attainment[4.0] = 0.92
    result = run_bench(cfg)
    assert [r for r, _ in sent] == [1.0, 2.0, 4.0, 8.0]
    data = json.loads(out.read_text())
    assert data["skipped_rates"] == [] and data["stopped_early"] is None
    assert "Stopped early" not in capsys.readouterr().out
    assert result.goodput.rate == 8.0 and not result.goodput.bracketed
