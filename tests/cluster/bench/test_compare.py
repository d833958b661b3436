"""`pdserve bench compare A.json B.json` on two made-up results (no server): goodput
throughput per matched rate, per class and in total, the ratio B/A, and the notes on rates
only one side ran, rates that were not steady, and short windows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pdserve.cluster.bench.classes import Objectives, ServerSlo
from pdserve.cluster.bench.compare import compare_results, ratio
from pdserve.cluster.bench.config import BenchConfig
from pdserve.cluster.bench.records import RequestRecord, Slo
from pdserve.cluster.bench.report import BenchResult, make_report, report_goodput
from pdserve.cluster.cli import main
from pdserve.proto import pdserve_pb2 as pb

SERVER = pb.ServerInfo(default_slo_class="standard", mode="colocated",
                       slo_classes=[pb.SloClass(name="interactive", ttft_ms=500, tpot_ms=50),
                                    pb.SloClass(name="batch", best_effort=True)])


def records(n: int, gap: float, interactive_ttft: float,
            refuse_every: int = 0) -> list[RequestRecord]:
    """Every other request interactive (TTFT `interactive_ttft`), the rest batch; every
    `refuse_every`-th refused at admission."""
    out = []
    for i in range(n):
        cls = "interactive" if i % 2 == 0 else "batch"
        send = i * gap
        if refuse_every and i % refuse_every == 0:
            out.append(RequestRecord(index=i, max_tokens=2, send_s=send, end_s=send + 0.01,
                                     status="RESOURCE_EXHAUSTED", slo_class=cls))
            continue
        ttft = interactive_ttft if cls == "interactive" else 2.0
        out.append(RequestRecord(index=i, max_tokens=2, send_s=send, end_s=send + ttft + 0.02,
                                 chunks=((send + ttft, 1), (send + ttft + 0.02, 1)),
                                 prompt_tokens=4, output_tokens=2, ok=True, slo_class=cls))
    return out


def result(label: str, scheduler: str, runs: dict[float, list[RequestRecord]],
           smoke: bool = False) -> dict[str, object]:
    server = ServerSlo.from_info(pb.ServerInfo(scheduler=scheduler, mode=SERVER.mode,
                                               default_slo_class=SERVER.default_slo_class,
                                               slo_classes=SERVER.slo_classes))
    objectives = Objectives.from_server(server, Slo())
    cfg = BenchConfig(label=label, request_rates=tuple(runs), smoke=smoke)
    reports = [make_report(label, rate, 1.0, None, recs, objectives, cfg.warmup_fraction)
               for rate, recs in runs.items()]
    res = BenchResult(cfg, {}, reports, list(runs.values()), report_goodput(reports, 0.9),
                      dict(server.info), objectives, [60.0] * len(runs))
    return json.loads(json.dumps(res.to_json()))


def test_ratio() -> None:
    assert ratio(2.0, 3.0) == "1.50" and ratio(0.0, 0.0) == "-" and ratio(0.0, 1.0) == "inf"


def test_compare_per_rate_and_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # FIFO: interactive TTFT 0.8 s at 4 req/s (misses 500 ms); SLO scheduling: 0.2 s, but
    # refuses every 10th request. At 8 req/s FIFO's queue grows.
    fifo = result("fifo", "fifo", {
        2.0: records(200, 0.5, 0.2),
        4.0: records(400, 0.25, 0.8),
        8.0: [r for r in records(400, 0.125, 0.3)
              for r in [RequestRecord(**{**r.__dict__, "end_s": r.end_s + 0.02 * r.index,
                                         "chunks": tuple((t + 0.02 * r.index, k)
                                                         for t, k in r.chunks)})]],
    })
    slo = result("slo", "slo", {
        2.0: records(200, 0.5, 0.2),
        4.0: records(400, 0.25, 0.2, refuse_every=10),
        16.0: records(400, 1 / 16, 0.2),
    }, smoke=True)
    text = compare_results(fifo, slo)
    lines = text.splitlines()
    assert lines[0] == "A: fifo (scheduler fifo, mode colocated)"
    assert lines[1] == "B: slo (scheduler slo, mode colocated)"

    def row(rate: str, cls: str) -> list[str]:
        hit = [ln for ln in lines if ln.startswith(f"| {rate} | {cls} |")]
        assert len(hit) == 1, (rate, cls, text)
        return [c.strip() for c in hit[0].strip("|").split("|")]

    # 2 req/s: the same records on both sides, every request met (batch has no objectives)
    assert row("2", "total")[2:] == [row("2", "total")[2], row("2", "total")[2], "1.00"]
    assert float(row("2", "total")[2]) == pytest.approx(2.0, rel=0.05)
    # 4 req/s: FIFO's interactive requests all miss; SLO's meet but for the refused ones
    # (every 10th request, all of them interactive: a fifth of the class)
    a4, b4 = row("4", "interactive")[2:4]
    assert float(a4) == 0.0 and float(b4) == pytest.approx(1.6, rel=0.05)
    assert row("4", "interactive")[4] == "inf"
    ta, tb, r = row("4", "total")[2:]
    assert float(ta) == pytest.approx(2.0, rel=0.05)  # batch only
    assert float(tb) == pytest.approx(3.6, rel=0.05)
    assert float(r) == pytest.approx(float(tb) / float(ta), abs=0.01)
    assert float(row("4", "batch")[2]) == pytest.approx(float(ta))
    assert not any(ln.startswith("| 8") or ln.startswith("| 16") for ln in lines)
    assert "- rates in A only (not compared): 8 req/s" in lines
    assert "- rates in B only (not compared): 16 req/s" in lines
    assert any("B ran short windows" in ln for ln in lines)

    # through the CLI, with a rate where one side was not steady
    slo8 = result("slo", "slo", {8.0: records(400, 0.125, 0.3)})
    fa, fb = tmp_path / "fifo.json", tmp_path / "slo.json"
    fa.write_text(json.dumps(fifo))
    fb.write_text(json.dumps(slo8))
    assert main(["bench", "compare", str(fa), str(fb)]) == 0
    out = capsys.readouterr().out
    assert "| 8 * | total |" in out
    assert "- * not steady, A at 8 req/s:" in out and "queue grows" in out
    assert "B at 8 req/s" not in out


def test_compare_reads_results_written_before_classes(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """An older result (one SLO in its config, no classes, no warm-up): totals only."""
    def old(label: str, ttft: float) -> dict[str, object]:
        recs = [RequestRecord(index=i, max_tokens=2, send_s=float(i), end_s=i + ttft + 0.1,
                              chunks=((i + ttft, 1), (i + ttft + 0.1, 1)), ok=True,
                              output_tokens=2) for i in range(30)]
        runs = [{"report": {"request_rate": 1.0},
                 "requests": [{k: v for k, v in r.to_json().items() if k != "slo_class"}
                              for r in recs]}]
        return {"label": label, "config": {"slo": {"ttft_ms": 500, "tpot_ms": None}},
                "runs": runs}

    text = compare_results(old("x", 0.2), old("y", 0.9))
    assert "| 1 | total | 1.03 | 0.00 | 0.00 |" in text
    assert "A ran short windows" in text and "B ran short windows" in text
    assert "scheduler ?" in text
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["bench", "compare", str(bad), str(bad)]) == 2
    assert "not a pdserve bench result" in capsys.readouterr().err
    assert math.isfinite(1.03)
