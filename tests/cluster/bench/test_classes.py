"""Unit tests of SLO classes in `pdserve bench` (no server): the class mix and its seeded
assignment, the objectives read from the server's ServerInfo, scoring per class (refusals at
admission are misses), and the workload drawn on demand."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from pdserve.cluster.bench.classes import (
    Objectives,
    ServerSlo,
    assign_classes,
    parse_class_mix,
)
from pdserve.cluster.bench.config import BenchConfig
from pdserve.cluster.bench.records import RequestRecord, Slo
from pdserve.cluster.bench.report import make_report
from pdserve.cluster.bench.tables import format_report
from pdserve.cluster.bench.workload import Workload
from pdserve.cluster.cli import main
from pdserve.proto import pdserve_pb2 as pb

# as deploy/slo-classes.yaml
SERVER = pb.ServerInfo(
    mode="disaggregated", scheduler="slo", version="t", default_slo_class="standard",
    slo_classes=[pb.SloClass(name="interactive", ttft_ms=500, tpot_ms=50, priority=2),
                 pb.SloClass(name="standard", ttft_ms=2000, tpot_ms=100, priority=1),
                 pb.SloClass(name="batch", priority=0, best_effort=True)])


def rec(i: int, cls: str, ttft: float = 0.1, tpot: float = 0.02,
        status: str = "OK") -> RequestRecord:
    """Request i sent at i s with 3 tokens (a TTFT, then two gaps of `tpot`)."""
    send = float(i)
    ok = status == "OK"
    chunks = ((send + ttft, 1), (send + ttft + tpot, 1), (send + ttft + 2 * tpot, 1)) if ok else ()
    return RequestRecord(index=i, max_tokens=3, send_s=send,
                         end_s=chunks[-1][0] if ok else send + 0.01, chunks=chunks,
                         prompt_tokens=4, output_tokens=3 if ok else 0, ok=ok, status=status,
                         slo_class=cls)


# ---------------------------------------------------------------- the class mix


def test_parse_class_mix() -> None:
    assert parse_class_mix("interactive=0.3,batch=0.7") == (("interactive", 0.3),
                                                            ("batch", 0.7))
    assert parse_class_mix(" a = 1 ") == (("a", 1.0),)
    for bad, what in (("a=0.5,b=0.4", "sum to 1"), ("a=0.5,a=0.5", "twice"), ("a", "NAME=SHARE"),
                      ("a=x,b=1", "NAME=SHARE"), ("a=0,b=1", "NAME=SHARE"), ("", "no class"),
                      ("=1", "NAME=SHARE")):
        with pytest.raises(ValueError, match=what):
            parse_class_mix(bad)


def test_assignment_is_seeded_stable_by_prefix_and_near_the_shares() -> None:
    mix = (("interactive", 0.3), ("batch", 0.7))
    many = assign_classes(10_000, mix, seed=7)
    assert many == assign_classes(10_000, mix, seed=7)
    assert many[:500] == assign_classes(500, mix, seed=7)  # every rate: request i, one class
    assert many != assign_classes(10_000, mix, seed=8)
    share = Counter(many)["interactive"] / len(many)
    assert share == pytest.approx(0.3, abs=0.02)  # 4.4 sigma of a binomial at n = 10,000
    assert assign_classes(0, mix, 7) == []
    assert set(assign_classes(100, (("only", 1.0),), 1)) == {"only"}


def test_config_takes_one_way_of_naming_classes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="not both"):
        BenchConfig(slo_class="batch", class_mix=(("batch", 1.0),))
    with pytest.raises(ValueError, match="sum to 1"):
        BenchConfig(class_mix=(("a", 0.5),))
    assert main(["bench", "--class-mix", "a=0.5"]) == 2
    assert "sum to 1" in capsys.readouterr().err


# ---------------------------------------------------------------- the server's objectives


def test_server_classes_resolve_and_unknown_ones_are_refused() -> None:
    server = ServerSlo.from_info(SERVER)
    assert (server.scheduler, server.mode, server.default_class) == ("slo", "disaggregated",
                                                                     "standard")
    assert server.resolve(None) == "standard" and server.resolve("batch") == "batch"
    with pytest.raises(ValueError, match=r"no SLO class 'gold'.*batch, interactive, standard"):
        server.resolve("gold")
    assert ServerSlo().resolve(None) == ""  # a server without classes: none named
    with pytest.raises(ValueError, match="lists no SLO classes"):
        ServerSlo().resolve("batch")
    assert server.info["slo_classes"][2] == {"name": "batch", "ttft_ms": None, "tpot_ms": None,
                                             "priority": 0, "best_effort": True}


def test_objectives_are_the_classes_with_explicit_ones_overriding() -> None:
    server = ServerSlo.from_info(SERVER)
    o = Objectives.from_server(server, Slo())
    assert o.by_class == {"interactive": Slo(500, 50), "standard": Slo(2000, 100),
                          "batch": Slo()}
    o = Objectives.from_server(server, Slo(ttft_ms=300))  # --slo-ttft-ms 300 for all
    assert o.by_class["interactive"] == Slo(300, 50) and o.by_class["batch"] == Slo(300, None)
    assert Objectives.from_server(ServerSlo(), Slo(100, 10)).slo_for(rec(0, "")) == Slo(100, 10)
    # saved with the result and read back as scored
    saved = json.loads(json.dumps({"objectives": o.to_json()}))
    assert Objectives.from_result(saved) == o
    assert Objectives.from_result({"config": {"slo": {"ttft_ms": 7, "tpot_ms": None}}}) == \
        Objectives.uniform(Slo(7, None))


def test_each_class_is_scored_by_its_objectives_and_refusals_are_misses() -> None:
    o = Objectives.from_server(ServerSlo.from_info(SERVER), Slo())
    records = [
        rec(0, "interactive", ttft=0.3),  # meets 500 ms
        rec(1, "interactive", ttft=0.8),  # misses 500 ms ...
        rec(2, "standard", ttft=0.8),  # ... which meets standard's 2000 ms
        rec(3, "interactive", status="RESOURCE_EXHAUSTED"),  # refused at admission: a miss
        rec(4, "batch", ttft=9.0, tpot=0.5),  # best effort, no objectives: met when completed
        rec(5, "interactive", ttft=0.1, tpot=0.06),  # TPOT 60 > 50 ms
        rec(6, "standard", status="RESOURCE_EXHAUSTED"),
        rec(7, "batch", status="UNAVAILABLE"),  # failed: a miss even without objectives
        rec(8, "interactive", ttft=0.2),
    ]
    rep = make_report("x", 1.0, 1.0, None, records, o, warmup_fraction=0.0)
    assert rep.num_requests == rep.counted_requests == 9 and rep.window_s == pytest.approx(8.0)
    assert rep.attainment == pytest.approx(4 / 9)
    assert rep.failures == {"RESOURCE_EXHAUSTED": 2, "UNAVAILABLE": 1}
    assert rep.slo_goodput_throughput == pytest.approx(4 / 8)
    c = rep.classes
    assert list(c) == ["interactive", "standard", "batch"]
    assert (c["interactive"].requests, c["interactive"].refused) == (5, 1)
    assert c["interactive"].attainment == pytest.approx(2 / 5)
    assert c["interactive"].goodput_throughput == pytest.approx(2 / 8)
    assert (c["interactive"].slo_ttft_ms, c["interactive"].slo_tpot_ms) == (500, 50)
    assert c["standard"].attainment == pytest.approx(1 / 2) and c["standard"].refused == 1
    assert c["batch"].attainment == pytest.approx(1 / 2) and c["batch"].completed == 1
    assert sum(x.goodput_throughput for x in c.values()) == pytest.approx(
        rep.slo_goodput_throughput)
    text = format_report(rep)
    assert "SLO classes" in text and "interactive" in text and "per class" in text


def test_records_carry_their_class_through_json() -> None:
    r = rec(3, "batch")
    back = RequestRecord.from_json(json.loads(json.dumps(r.to_json())))
    assert back == r and back.slo_class == "batch"
    old = r.to_json()
    del old["slo_class"]  # a result written before SLO classes
    assert RequestRecord.from_json(old).slo_class == ""


# ---------------------------------------------------------------- the workload on demand


INFO = pb.ModelInfo(model_name="m", vocab_size=5000, max_context_length=4096)


def test_workload_is_stable_by_prefix_and_carries_classes() -> None:
    cfg = BenchConfig(input_len=16, output_len=4, input_len_dist="uniform", range_ratio=0.5,
                      seed=3, class_mix=(("interactive", 0.3), ("batch", 0.7)))
    server = ServerSlo.from_info(SERVER)
    w = Workload(cfg, INFO, server)
    few = w.take(10)
    many = Workload(cfg, INFO, server).take(700)  # three chunks
    assert many[:10] == few == w.take(10)
    assert {p.slo_class for p in many} == {"interactive", "batch"}
    assert [p.slo_class for p in many] == assign_classes(700, cfg.class_mix, 3)
    assert len({p.token_ids for p in many}) == 700
    # one class for all, or the server's default
    assert {p.slo_class for p in Workload(BenchConfig(slo_class="batch"), INFO,
                                          server).take(5)} == {"batch"}
    assert {p.slo_class for p in Workload(BenchConfig(), INFO, server).take(5)} == {"standard"}
    assert {p.slo_class for p in Workload(BenchConfig(), INFO).take(5)} == {""}
    with pytest.raises(ValueError, match="no SLO class 'gold'"):
        Workload(BenchConfig(class_mix=(("gold", 1.0),)), INFO, server)


def test_jsonl_workload_cycles_its_file(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "max_tokens": 2}\n')
    cfg = BenchConfig(dataset="jsonl", dataset_path=str(path), output_len=5)
    got = Workload(cfg, INFO).take(5)
    assert [p.text for p in got] == ["a", "b", "a", "b", "a"]
    assert [p.output_len for p in got] == [5, 2, 5, 2, 5]
    assert math.isinf(cfg.request_rates[0])
