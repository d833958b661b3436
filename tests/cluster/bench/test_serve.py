"""`pdserve bench` against a real local deployment (Ray actors, gRPC server, the default model,
the SLO classes of deploy/slo-classes.yaml): a short sweep through the CLI (--smoke: windows
far below steady state), whose JSON report is checked against its own per-request records,
a class mix scored by the server's objectives, and a JSONL run."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from pdserve.cluster.bench.config import BenchConfig
from pdserve.cluster.bench.records import RequestRecord, Slo
from pdserve.cluster.bench.serve import run_bench
from pdserve.cluster.cli import main
from pdserve.cluster.launch import job_runtime_env, launch
from pdserve_testing.e2e import serve_config

pytestmark = pytest.mark.e2e

CLASSES = Path(__file__).resolve().parents[3] / "deploy" / "slo-classes.yaml"
RATES = (2.0, 8.0)
NUM_PROMPTS = 6
# smoke windows of exactly NUM_PROMPTS requests a rate, every one counted
SMOKE = ["--smoke", "--min-requests", str(NUM_PROMPTS), "--min-duration-s", "0.5",
         "--duration-factor", "0", "--warmup-fraction", "0"]
OUTPUT_LEN = 8
SLO_TTFT_MS, SLO_TPOT_MS = 2000.0, 300.0


@pytest.fixture(scope="module")
def server(default_gguf: Path) -> Iterator[str]:
    """A deployment of its own; Ray is started here only if nothing else started it."""
    started = not ray.is_initialized()
    if started:
        ray.init(namespace="pdserve-tests", include_dashboard=False, num_cpus=8,
                 object_store_memory=200 * 1024 * 1024, log_to_driver=True,
                 runtime_env=job_runtime_env())
    try:
        dep = launch(serve_config(default_gguf, "bench-test", slo_classes=str(CLASSES)))
        try:
            yield dep.address
        finally:
            dep.stop()
    finally:
        if started:
            ray.shutdown()


def ttft_ms(r: RequestRecord) -> float:
    """Recomputed from the raw chunk times, not through the record's properties."""
    first = next(t for t, n in r.chunks if n > 0)
    return (first - r.send_s) * 1e3


def tpot_ms(r: RequestRecord) -> float:
    return ((r.end_s - r.send_s) * 1e3 - ttft_ms(r)) / (r.output_tokens - 1)


def itls_ms(r: RequestRecord) -> list[float]:
    """Gaps between responses with tokens after the first, each spread over its tokens."""
    timed = [(t, n) for t, n in r.chunks if n > 0]
    out: list[float] = []
    for (prev, _), (t, n) in pairwise(timed):
        out += [(t - prev) * 1e3 / n] * n
    assert len(out) == r.output_tokens - timed[0][1]
    return out


def check_stats(stats: dict[str, float], values: list[float]) -> None:
    assert stats["count"] == len(values)
    assert stats["mean_ms"] == pytest.approx(float(np.mean(values)), rel=1e-6)
    for q in (50, 90, 99):
        assert stats[f"p{q}_ms"] == pytest.approx(float(np.percentile(values, q)), rel=1e-6)


def test_rate_sweep_report_matches_records(server: str, tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    plots = tmp_path / "plots"
    rc = main([
        "bench", "--server", server, "--label", "cpu", "--dataset", "random", *SMOKE,
        "--input-len", "24", "--input-len-dist", "uniform",
        "--range-ratio", "0.3", "--output-len", str(OUTPUT_LEN),
        "--request-rate", ",".join(f"{r:g}" for r in RATES), "--seed", "3",
        "--slo-ttft-ms", str(SLO_TTFT_MS), "--slo-tpot-ms", str(SLO_TPOT_MS),
        "--timeout", "120", "--result-json", str(out), "--plot-dir", str(plots),
        "--no-progress",
    ])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["label"] == "cpu" and data["config"]["request_rates"] == list(RATES)
    assert data["config"]["slo"] == {"ttft_ms": SLO_TTFT_MS, "tpot_ms": SLO_TPOT_MS}
    assert data["steady_state"] is False and data["config"]["smoke"] is True
    assert data["server"]["scheduler"] == "slo" and data["server"]["mode"] == "disaggregated"
    # the explicit objectives override every class's, as on the server
    assert data["objectives"]["by_class"]["interactive"] == {"ttft_ms": SLO_TTFT_MS,
                                                             "tpot_ms": SLO_TPOT_MS}
    assert len(data["runs"]) == len(RATES)
    prompts_per_rate = []
    for run, rate in zip(data["runs"], RATES, strict=True):
        rep = run["report"]
        recs = [RequestRecord.from_json(d) for d in run["requests"]]
        assert rep["request_rate"] == rate and len(recs) == NUM_PROMPTS
        assert rep["counted_requests"] == NUM_PROMPTS  # --warmup-fraction 0
        assert [r.index for r in recs] == list(range(NUM_PROMPTS))
        assert {r.slo_class for r in recs} == {"standard"}  # the server's default class
        assert set(rep["steadiness"]) >= {"steady", "reason", "completion_ratio"}
        ok = [r for r in recs if r.ok]
        # the tiny workload fits easily: everything completes, with exactly OUTPUT_LEN tokens
        assert rep["completed"] == len(ok) == NUM_PROMPTS and rep["failed"] == 0
        for r in ok:
            assert r.output_tokens == OUTPUT_LEN and r.finish_reason == "length"
            assert 16 <= r.prompt_tokens <= 32
            assert r.send_s <= r.chunks[0][0] <= r.end_s
            assert r.server_timing["ttft_s"] > 0
            assert r.server_timing["e2e_s"] <= r.end_s - r.send_s + 0.05
        prompts_per_rate.append([r.prompt_tokens for r in recs])
        duration = max(r.end_s for r in recs)
        inp = sum(r.prompt_tokens for r in ok)
        outp = sum(r.output_tokens for r in ok)
        assert rep["duration_s"] == pytest.approx(duration)
        assert rep["total_input_tokens"] == inp and rep["total_output_tokens"] == outp
        assert rep["request_throughput"] == pytest.approx(len(ok) / duration)
        assert rep["output_throughput"] == pytest.approx(outp / duration)
        assert rep["total_token_throughput"] == pytest.approx((inp + outp) / duration)
        ttfts = [ttft_ms(r) for r in ok]
        tpots = [tpot_ms(r) for r in ok]
        check_stats(rep["ttft"], ttfts)
        check_stats(rep["tpot"], tpots)
        check_stats(rep["e2e"], [(r.end_s - r.send_s) * 1e3 for r in ok])
        check_stats(rep["itl"], [v for r in ok for v in itls_ms(r)])
        met = [a <= SLO_TTFT_MS and b <= SLO_TPOT_MS for a, b in zip(ttfts, tpots, strict=True)]
        assert rep["attainment"] == pytest.approx(sum(met) / NUM_PROMPTS)
        assert rep["attainment_ttft"] == pytest.approx(
            sum(a <= SLO_TTFT_MS for a in ttfts) / NUM_PROMPTS)
        assert rep["request_goodput"] == pytest.approx(sum(met) / duration)
        window = max(r.send_s for r in recs) - min(r.send_s for r in recs)
        assert rep["slo_goodput_throughput"] == pytest.approx(sum(met) / window)
        # the requests arrive at the configured rate's schedule, not all at once
        sends = sorted(r.send_s for r in recs)
        assert sends[-1] > 0.5 / rate
    assert prompts_per_rate[0] == prompts_per_rate[1]  # the same workload at every rate
    passing = [rate for run, rate in zip(data["runs"], RATES, strict=True)
               if run["report"]["attainment"] >= 0.9 and run["report"]["steadiness"]["steady"]]
    assert data["goodput"]["rate"] == (max(passing) if passing else None)
    for name in ("slo_attainment.png", "latency_cdf.png"):
        png = plots / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            im.verify()


def test_jsonl_dataset(server: str, tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "The capital of France is", "max_tokens": 4},
        {"messages": [{"role": "user", "content": "Say hi."}], "output_len": 3},
        {"prompt": "1, 2, 3,"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = BenchConfig(server=server, label="jsonl", dataset="jsonl", dataset_path=str(path),
                      min_requests=3, smoke=True, output_len=5, request_rates=(math.inf,),
                      max_concurrency=2, ignore_eos=True, slo=Slo(ttft_ms=5000),
                      progress=False, request_timeout_s=120)
    result = run_bench(cfg)
    (rep,) = result.reports
    (recs,) = result.records
    assert rep.completed == 3 and rep.failed == 0 and rep.max_concurrency == 2
    assert [r.output_tokens for r in recs] == [4, 3, 5]  # ignore_eos: exactly max_tokens
    assert all(r.prompt_tokens > 3 for r in recs)  # counted by the server's tokenizer
    assert recs[1].prompt_tokens > 5  # the chat template wraps the message
    assert rep.total_output_tokens == 12 and rep.tpot.count == 3


def test_sweep_stops_below_attainment(server: str, tmp_path: Path) -> None:
    """A TTFT objective no request can meet: the ascending sweep runs its lowest rate only.
    The requests are of a best-effort class, so the server's SLO admission never refuses
    them: they complete, late."""
    out = tmp_path / "stop.json"
    rc = main([
        "bench", "--server", server, "--label", "stop", "--smoke", "--min-requests", "3",
        "--min-duration-s", "0.1", "--input-len", "8", "--output-len", "2",
        "--request-rate", "16,4,8", "--slo-class", "batch",
        "--slo-ttft-ms", "0.001", "--stop-below-attainment", "0.9",
        "--timeout", "120", "--result-json", str(out), "--no-progress",
    ])
    assert rc == 0
    data = json.loads(out.read_text())
    (run,) = data["runs"]
    assert run["report"]["request_rate"] == 4.0 and run["report"]["attainment"] == 0.0
    assert run["report"]["num_requests"] == len(run["requests"]) == 3  # the floor: all 3
    assert run["report"]["completed"] == 3  # batch is best effort: never refused
    assert data["skipped_rates"] == [8.0, 16.0]
    assert "0.0% at 4 req/s" in data["stopped_early"]
    assert data["goodput"]["rate"] is None


def test_client_processes_share_one_schedule(server: str) -> None:
    """Requests sent from three client processes: every request once, each at or after its
    offset from the common start, two rates through the same processes, and the report
    computed from the merged records as for one process."""
    from pdserve.cluster.bench.data import arrival_offsets

    rates = (4.0, 8.0)
    cfg = BenchConfig(server=server, label="shards", smoke=True, min_requests=7,
                      min_duration_s=0.1, duration_factor=0, warmup_fraction=0, input_len=8,
                      output_len=3, request_rates=rates, seed=5, client_processes=3,
                      max_concurrency=6, slo=Slo(ttft_ms=60000), progress=False,
                      request_timeout_s=120)
    result = run_bench(cfg)
    for rate, rep, recs in zip(rates, result.reports, result.records, strict=True):
        assert [r.index for r in recs] == list(range(7))
        assert rep.completed == 7 and rep.failed == 0
        assert all(r.output_tokens == 3 for r in recs)
        offsets = arrival_offsets(7, rate, 1.0, 5).tolist()
        # never early: a request leaves at its offset from the start the processes share
        assert all(r.send_s >= at - 1e-3 for r, at in zip(recs, offsets, strict=True))
        assert rep.total_output_tokens == 21 and rep.ttft.count == 7
        check_stats(dataclasses.asdict(rep.ttft), [ttft_ms(r) for r in recs])


def test_class_mix_scored_by_the_servers_objectives(server: str, tmp_path: Path) -> None:
    """A seeded mix of two of the server's classes: each request carries its class, the
    report scores each class by the objectives GetServerInfo lists, and the classes' goodput
    throughputs add up to the total."""
    from pdserve.cluster.bench.classes import assign_classes

    out = tmp_path / "mix.json"
    mix = (("standard", 0.5), ("batch", 0.5))
    rc = main(["bench", "--server", server, "--label", "mix", "--smoke", "--min-requests", "8",
               "--min-duration-s", "0.1", "--warmup-fraction", "0", "--input-len", "8",
               "--output-len", "3", "--request-rate", "8", "--seed", "4",
               "--class-mix", "standard=0.5,batch=0.5", "--timeout", "120",
               "--result-json", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["objectives"]["by_class"]["standard"] == {"ttft_ms": 2000.0, "tpot_ms": 100.0}
    assert data["objectives"]["by_class"]["batch"] == {"ttft_ms": None, "tpot_ms": None}
    assert [c["name"] for c in data["server"]["slo_classes"]] == ["interactive", "standard",
                                                                 "batch"]
    (run,) = data["runs"]
    recs = [RequestRecord.from_json(d) for d in run["requests"]]
    assert [r.slo_class for r in recs] == assign_classes(8, mix, 4)
    classes = run["report"]["classes"]
    assert set(classes) == {r.slo_class for r in recs}
    assert sum(c["requests"] for c in classes.values()) == 8
    assert sum(c["goodput_throughput"] for c in classes.values()) == pytest.approx(
        run["report"]["slo_goodput_throughput"])
    if "batch" in classes:  # best effort, no objectives: every completed request meets them
        assert classes["batch"]["attainment"] == pytest.approx(
            classes["batch"]["completed"] / classes["batch"]["requests"])
