"""Unit tests of `pdserve bench`'s statistics, load shape and datasets (no server)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pdserve.cluster.bench.config import BenchConfig
from pdserve.cluster.bench.data import (
    CHAT_MIX,
    DatasetError,
    arrival_offsets,
    chat_lengths,
    load_jsonl,
    sample_lengths,
    token_prompts,
)
from pdserve.cluster.bench.plot import plot_results
from pdserve.cluster.bench.records import RequestRecord, Slo
from pdserve.cluster.bench.report import (
    jsonable,
    latency_stats,
    make_report,
    percentile,
    rescore_goodput,
    sweep_goodput,
)
from pdserve.cluster.bench.serve import parse_rates
from pdserve.cluster.bench.tables import format_report, format_sweep
from pdserve.cluster.cli import main
from pdserve.proto import pdserve_pb2 as pb

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rec(i: int, send: float, chunks: list[tuple[float, int]], ok: bool = True,
        prompt: int = 10, status: str = "OK") -> RequestRecord:
    end = chunks[-1][0] if chunks else send + 0.05
    return RequestRecord(index=i, max_tokens=8, send_s=send, end_s=end, chunks=tuple(chunks),
                         prompt_tokens=prompt, output_tokens=sum(n for _, n in chunks), ok=ok,
                         status=status, error="" if ok else "no")


# ---------------------------------------------------------------- percentiles and records


def test_percentile_interpolates_linearly() -> None:
    v = [4.0, 1.0, 3.0, 2.0]
    assert percentile(v, 0) == 1.0 and percentile(v, 100) == 4.0
    assert percentile(v, 50) == pytest.approx(2.5)
    assert percentile(v, 90) == pytest.approx(3.7)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_latency_stats_in_ms_and_empty() -> None:
    s = latency_stats([0.001 * i for i in range(1, 101)])
    assert s.count == 100
    assert s.mean_ms == pytest.approx(50.5)
    assert s.p50_ms == pytest.approx(50.5)
    assert s.p90_ms == pytest.approx(90.1)
    assert s.p99_ms == pytest.approx(99.01)
    e = latency_stats([])
    assert e.count == 0 and e.mean_ms is None and e.p99_ms is None


def test_ttft_tpot_itl_of_one_request() -> None:
    # first token at 0.3, then one token at 0.4, a merged chunk of 3 tokens at 0.7,
    # and an empty final response at 0.75
    r = rec(0, 0.1, [(0.3, 1), (0.4, 1), (0.7, 3), (0.75, 0)])
    assert r.output_tokens == 5
    assert r.ttft_s == pytest.approx(0.2)
    assert r.e2e_s == pytest.approx(0.65)
    assert r.tpot_s == pytest.approx((0.65 - 0.2) / 4)
    assert r.itl_s() == pytest.approx([0.1, 0.1, 0.1, 0.1])  # the 0.3 gap spread over 3 tokens


def test_single_token_and_failed_requests_have_no_tpot() -> None:
    one = rec(0, 0.0, [(0.2, 1)])
    assert one.ttft_s == pytest.approx(0.2) and one.tpot_s is None and one.itl_s() == []
    bad = rec(1, 0.0, [(0.2, 1)], ok=False, status="RESOURCE_EXHAUSTED")
    assert bad.ttft_s is None and bad.tpot_s is None and bad.e2e_s is None and bad.itl_s() == []


def test_record_json_round_trip() -> None:
    r = rec(3, 0.5, [(0.6, 2), (0.9, 1)])
    d = json.loads(json.dumps(r.to_json()))
    assert RequestRecord.from_json(d) == r
    assert d["ttft_ms"] == pytest.approx(100.0) and d["tpot_ms"] == pytest.approx(150.0)


def test_jsonable_maps_inf_and_nan() -> None:
    assert jsonable({"a": math.inf, "b": [math.nan, 1.5], "c": (1, -math.inf)}) == {
        "a": "inf", "b": [None, 1.5], "c": [1, "-inf"]}


# ---------------------------------------------------------------- reports and SLOs


def test_report_counts_throughput_and_attainment() -> None:
    records = [
        rec(0, 0.0, [(0.1, 1), (0.2, 1), (0.3, 1)]),  # TTFT 100, TPOT 100: meets both
        rec(1, 0.5, [(0.9, 1), (1.0, 1), (1.1, 1)]),  # TTFT 400: misses TTFT
        rec(2, 1.0, [(1.1, 1), (1.5, 1), (1.9, 1)]),  # TPOT 400: misses TPOT
        rec(3, 1.5, [(1.6, 1)]),  # one token: TPOT undefined, meets
        rec(4, 2.0, [], ok=False, status="RESOURCE_EXHAUSTED", prompt=99),  # a miss
    ]
    rep = make_report("x", 2.0, 1.0, None, records, Slo(ttft_ms=200, tpot_ms=200))
    assert (rep.num_requests, rep.completed, rep.failed) == (5, 4, 1)
    assert rep.failures == {"RESOURCE_EXHAUSTED": 1}
    assert rep.first_error.startswith("RESOURCE_EXHAUSTED")
    assert rep.duration_s == pytest.approx(2.05)
    assert rep.total_input_tokens == 40 and rep.total_output_tokens == 10
    assert rep.request_throughput == pytest.approx(4 / 2.05)
    assert rep.output_throughput == pytest.approx(10 / 2.05)
    assert rep.total_token_throughput == pytest.approx(50 / 2.05)
    assert rep.attainment == pytest.approx(2 / 5)
    assert rep.attainment_ttft == pytest.approx(3 / 5)
    assert rep.attainment_tpot == pytest.approx(3 / 5)
    assert rep.request_goodput == pytest.approx(2 / 2.05)
    assert rep.ttft.count == 4 and rep.tpot.count == 3 and rep.e2e.count == 4
    assert rep.itl.count == 6
    assert rep.ttft.p50_ms == pytest.approx(100.0)
    text = format_report(rep)
    assert "Failed requests:" in text and "40.0%" in text


def steady_records(n: int, ttft: float, tpot: float, ok: bool = True,
                   status: str = "OK") -> list[RequestRecord]:
    """n requests one a second, each with the same latencies (3 tokens): a steady run."""
    return [rec(i, float(i), [(i + ttft, 1), (i + ttft + tpot, 1), (i + ttft + 2 * tpot, 1)])
            if ok else rec(i, float(i), [], ok=False, status=status) for i in range(n)]


def test_rescore_goodput_under_other_slos() -> None:
    """A saved sweep rescored: rate 1 has TPOT 100 ms, rate 2 TPOT 300 ms, rate 4 failures;
    under a 200 ms TPOT goodput is 1 req/s, under 400 ms it is 2, and without TPOT objective
    (TTFT 200 ms only) still 2 (rate 4 fails)."""
    def run(rate: float, records: list[RequestRecord]) -> dict[str, object]:
        return {"report": {"request_rate": rate}, "requests": [r.to_json() for r in records]}

    result = json.loads(json.dumps({"runs": [
        run(1.0, steady_records(30, 0.1, 0.1)),
        run(2.0, steady_records(30, 0.1, 0.3)),
        run(4.0, steady_records(30, 0, 0, ok=False, status="UNAVAILABLE")),
    ]}))
    assert rescore_goodput(result, Slo(ttft_ms=200, tpot_ms=200)).rate == 1.0
    tight = rescore_goodput(result, Slo(ttft_ms=200, tpot_ms=400))
    assert tight.rate == 2.0 and tight.bracketed
    assert rescore_goodput(result, Slo(ttft_ms=200)).rate == 2.0
    assert rescore_goodput(result, Slo(ttft_ms=50)).rate is None


def test_rescore_counts_an_unsteady_rate_as_missed() -> None:
    """The same records, but rate 2's queue grows (TTFT rises with arrival time): missed
    whatever its attainment under a loose objective."""
    growing = [rec(i, float(i), [(i + 0.1 + 0.2 * i, 1), (i + 0.2 + 0.2 * i, 1)])
               for i in range(30)]
    result = {"runs": [
        {"report": {"request_rate": r}, "requests": [x.to_json() for x in recs]}
        for r, recs in ((1.0, steady_records(30, 0.1, 0.1)), (2.0, growing))]}
    g = rescore_goodput(result, Slo(ttft_ms=60_000))
    assert g.rate == 1.0 and g.bracketed and "not steady" in g.note


def test_no_slo_means_completed_requests_attain() -> None:
    records = [rec(0, 0.0, [(5.0, 2)]), rec(1, 0.0, [], ok=False, status="UNAVAILABLE")]
    rep = make_report("x", math.inf, 1.0, 4, records, Slo())
    assert rep.attainment == 0.5 and rep.attainment_ttft == 0.5


def test_slo_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ttft_ms"):
        Slo(ttft_ms=0)


# ---------------------------------------------------------------- goodput over a sweep


def test_goodput_bracketed() -> None:
    g = sweep_goodput([(4.0, 0.5), (1.0, 1.0), (2.0, 0.95), (3.0, 0.85)], 0.9)
    assert g.rate == 2.0 and g.bracketed
    assert "3" in g.note


def test_goodput_not_bracketed_above() -> None:
    g = sweep_goodput([(1.0, 1.0), (2.0, 0.91)], 0.9)
    assert g.rate == 2.0 and not g.bracketed and "highest" in g.note


def test_goodput_not_bracketed_below() -> None:
    g = sweep_goodput([(1.0, 0.8), (2.0, 0.5)], 0.9)
    assert g.rate is None and not g.bracketed and "lowest" in g.note


def test_goodput_non_monotone_takes_highest_passing_and_exact_target_passes() -> None:
    g = sweep_goodput([(1.0, 0.5), (2.0, 0.9), (3.0, 0.2), (math.inf, 0.1)], 0.9)
    assert g.rate == 2.0 and g.bracketed
    assert sweep_goodput([], 0.9).rate is None


# ---------------------------------------------------------------- load shape


def test_poisson_arrivals_mean_rate_and_variance() -> None:
    t = arrival_offsets(20001, 5.0, 1.0, seed=7)
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert 20000 / t[-1] == pytest.approx(5.0, rel=0.03)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    assert np.array_equal(t, arrival_offsets(20001, 5.0, 1.0, seed=7))


def test_gamma_burstiness_changes_variance_not_rate() -> None:
    bursty = np.diff(arrival_offsets(20001, 5.0, 0.25, seed=3))
    steady = np.diff(arrival_offsets(20001, 5.0, 4.0, seed=3))
    for gaps in (bursty, steady):
        assert np.mean(gaps) == pytest.approx(0.2, rel=0.05)
    # Gamma(shape B, mean m) has variance m^2 / B
    assert np.var(bursty) == pytest.approx(0.04 / 0.25, rel=0.15)
    assert np.var(steady) == pytest.approx(0.04 / 4.0, rel=0.1)


def test_infinite_rate_sends_all_at_once() -> None:
    assert np.all(arrival_offsets(10, math.inf, 1.0, seed=0) == 0)


def test_parse_rates() -> None:
    assert parse_rates("1,2.5, 8") == (1.0, 2.5, 8.0)
    assert parse_rates("inf") == (math.inf,)
    with pytest.raises(ValueError, match="request-rate"):
        parse_rates("1,fast")
    with pytest.raises(ValueError, match="request-rate"):
        BenchConfig(request_rates=(1.0, 0.0))


# ---------------------------------------------------------------- datasets


def test_length_distributions() -> None:
    rng = np.random.default_rng(0)
    n = 20000
    assert np.all(sample_lengths(rng, 100, "fixed", 0.5, 5) == 100)
    assert np.all(sample_lengths(rng, 100, "normal", 0.0, 5) == 100)
    u = sample_lengths(rng, 100, "uniform", 0.5, n)
    assert u.min() == 50 and u.max() == 150 and np.mean(u) == pytest.approx(100, rel=0.02)
    g = sample_lengths(rng, 100, "normal", 0.2, n)
    assert np.mean(g) == pytest.approx(100, rel=0.02) and np.std(g) == pytest.approx(20, rel=0.05)
    ln = sample_lengths(rng, 100, "lognormal", 0.8, n)
    assert np.mean(ln) == pytest.approx(100, rel=0.05)
    assert np.median(ln) < 0.8 * np.mean(ln)  # a right tail
    assert min(u.min(), g.min(), ln.min()) >= 1


def test_chat_mix_lengths() -> None:
    rng = np.random.default_rng(1)
    inp, out = chat_lengths(rng, 20000)
    lo_in, hi_in = min(b[0] for b in CHAT_MIX), max(b[0] for b in CHAT_MIX)
    assert inp.min() >= 0.75 * lo_in - 1 and inp.max() <= 1.25 * hi_in + 1
    assert out.min() >= 1
    w = np.array([b[2] for b in CHAT_MIX])
    short = sum(b[2] for b in CHAT_MIX if b[0] <= 64) / w.sum()
    assert np.mean(inp <= 80) == pytest.approx(short, abs=0.02)


def test_token_prompts_avoid_special_tokens_and_fit_the_context() -> None:
    info = pb.ModelInfo(vocab_size=5000, max_context_length=64, eos_token_ids=[1234],
                        max_tokens_limit=16)
    rng = np.random.default_rng(0)
    prompts = token_prompts(rng, np.array([10, 100, 2000]), np.array([8, 40, 8]), info)
    assert [p.output_len for p in prompts] == [8, 16, 8]
    assert [len(p.token_ids or ()) for p in prompts] == [10, 48, 56]
    for p in prompts:
        ids = np.array(p.token_ids)
        assert ids.min() >= 1000 and ids.max() < 5000 and 1234 not in ids


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    return path


def test_jsonl_parses_prompts_messages_and_lengths(tmp_path: Path) -> None:
    path = write(tmp_path, '{"prompt": "Hi", "max_tokens": 5}\n\n'
                           '{"messages": [{"role": "user", "content": "Yo"}], "output_len": 3}\n'
                           '{"prompt": "Bye"}\n')
    got = load_jsonl(path, 5, default_output_len=7)
    assert [p.output_len for p in got] == [5, 3, 7, 5, 3]  # repeated in order
    assert got[0].text == "Hi" and got[1].messages == (("user", "Yo"),)
    assert len(load_jsonl(path, 1, 7)) == 1


@pytest.mark.parametrize(("lines", "lineno", "what"), [
    ('{"prompt": "a"}\n{"prompt": "b",}\n', 2, "not valid JSON"),
    ('{"prompt": "a"}\n\n["prompt"]\n', 3, "JSON object"),
    ('{"text": "a"}\n', 1, 'exactly one of "prompt" and "messages"'),
    ('{"prompt": "a", "messages": []}\n', 1, "exactly one"),
    ('{"prompt": ""}\n', 1, "non-empty string"),
    ('{"prompt": "a", "max_tokens": 0}\n', 1, '"max_tokens" must be a positive integer'),
    ('{"prompt": "a", "output_len": "5"}\n', 1, '"output_len" must be a positive integer'),
    ('{"prompt": "a", "max_tokens": true}\n', 1, "positive integer"),
    ('{"prompt": "a", "max_tokens": 2, "output_len": 2}\n', 1, "not both"),
    ('{"messages": [{"role": "user"}]}\n', 1, '"messages"[0]'),
    ('{"messages": []}\n', 1, "non-empty list"),
])
def test_jsonl_errors_name_the_line(tmp_path: Path, lines: str, lineno: int, what: str) -> None:
    path = write(tmp_path, lines)
    with pytest.raises(DatasetError) as e:
        load_jsonl(path, 3, 8)
    assert f"line {lineno}:" in str(e.value) and what in str(e.value)
    assert str(path) in str(e.value)


def test_jsonl_empty_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no records"):
        load_jsonl(write(tmp_path, "\n  \n"), 3, 8)
    with pytest.raises(DatasetError, match="cannot read"):
        load_jsonl(tmp_path / "nope.jsonl", 3, 8)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="dataset-path"):
        BenchConfig(dataset="jsonl")
    with pytest.raises(ValueError, match="range-ratio"):
        BenchConfig(range_ratio=1.0)
    with pytest.raises(ValueError, match="burstiness"):
        BenchConfig(burstiness=0)


# ---------------------------------------------------------------- tables and plots offline


def fake_result(label: str, attainments: dict[float, float]) -> dict[str, object]:
    runs = []
    for k, (rate, att) in enumerate(attainments.items()):
        records = [rec(i, 0.1 * i, [(0.1 * i + 0.05 * (k + 1), 1), (0.1 * i + 0.2, 2)])
                   for i in range(10)]
        rep = make_report(label, rate, 1.0, None, records, Slo(100, 100))
        rep = jsonable(rep)
        rep["attainment"] = att
        runs.append({"report": rep, "requests": [r.to_json() for r in records]})
    cfg = jsonable(BenchConfig(label=label, slo=Slo(100, 100)))
    return {"label": label, "config": cfg, "runs": runs}


def test_sweep_table_and_plots_from_saved_results(tmp_path: Path) -> None:
    a = fake_result("colocated", {1.0: 1.0, 2.0: 0.7, 4.0: 0.2})
    b = fake_result("disagg", {1.0: 1.0, 2.0: 0.95, 4.0: 0.6})
    paths = plot_results([a, b], tmp_path / "direct")
    for p in paths:
        assert p.read_bytes().startswith(PNG_MAGIC)
    files = []
    for d in (a, b):
        f = tmp_path / f"{d['label']}.json"
        f.write_text(json.dumps(d))
        files.append(str(f))
    assert main(["bench", "plot", *files, "--out", str(tmp_path / "cli"), "--rate", "2"]) == 0
    assert (tmp_path / "cli" / "slo_attainment.png").read_bytes().startswith(PNG_MAGIC)
    assert main(["bench", "--plot-from", files[0], "--plot-dir", str(tmp_path / "p2")]) == 0
    assert (tmp_path / "p2" / "latency_cdf.png").read_bytes().startswith(PNG_MAGIC)
    records = [rec(0, 0.0, [(0.1, 2)])]
    reps = [make_report("x", r, 1.0, None, records, Slo()) for r in (1.0, math.inf)]
    table = format_sweep(reps, sweep_goodput([(1.0, 1.0), (math.inf, 1.0)], 0.9))
    assert "inf" in table and "Goodput" in table and "not bracketed" in table


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--request-rate", "0"]) == 2
    assert "request-rate" in capsys.readouterr().err
    assert main(["bench", "--plot-from", "x.json"]) == 2
