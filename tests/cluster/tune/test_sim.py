"""A deployment on simulated time (``tune.sim``): the real router over simulated workers that
drive the real schedulers. Every request ends with its tokens; KV that runs out preempts and
the preempted still finish; impossible TTFT objectives are refused at admission; the router
reads the simulated clock (TTFT and inter-token gaps are exactly the profile's step times)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from pdserve.cluster.bench.records import Slo
from pdserve.cluster.tune.calls import CALL_LATENCY_S
from pdserve.cluster.tune.sim import SimRequest, Simulation, SimulationError, Watch
from pdserve.router.cost_model import CostModel
from pdserve_testing.tune import cpu_profile, deployment, synthetic_profile

# Lengths that exercise chunking (prompts beyond a 128-token step) and one-token answers.
LENGTHS = [(40, 12), (300, 5), (7, 1), (129, 20), (64, 64), (500, 3), (16, 30), (256, 9)]


def workload(n: int, gap_s: float) -> list[SimRequest]:
    return [SimRequest(i, i * gap_s, *LENGTHS[i % len(LENGTHS)]) for i in range(n)]


def all_free(sim: Simulation) -> bool:
    workers = [*sim.decode.values(), *sim.prefill.values()]
    return all(w.allocator.num_free == w.allocator.num_blocks for w in workers)


@pytest.mark.parametrize("over", [
    dict(mode="colocated", num_decode=2),
    dict(mode="disaggregated", num_prefill=1, num_decode=2, local_prefill_by_model=False),
    dict(mode="disaggregated", num_prefill=2, num_decode=1),  # the cost model may go local
    dict(mode="disaggregated", num_prefill=1, num_decode=2, local_prefill_max_tokens=64),
    dict(mode="disaggregated", num_prefill=1, num_decode=1, scheduler="fifo",
         layerwise_transfer=False),
], ids=["colocated", "disagg", "disagg-model", "disagg-threshold", "fifo-whole-transfers"])
def test_every_request_finishes_with_its_tokens(over: dict[str, object], tmp_path: Path) -> None:
    serve = deployment(cpu_profile(), tmp_path, max_batch_tokens=128, **over)
    reqs = workload(40, 0.05)
    sim = Simulation(serve, cpu_profile())
    res = sim.run(reqs, Slo(), Watch(0, len(reqs)))
    assert [r.index for r in res.records] == list(range(len(reqs)))
    for r, req in zip(res.records, reqs, strict=True):
        assert r.ok, (r.status, r.error)
        assert r.finish_reason == "length"
        assert r.output_tokens == req.output_len == sum(n for _, n in r.chunks)
        assert r.prompt_tokens == req.input_len
        assert r.chunks[0][1] == 1  # the first token comes alone, from the prefill
        assert r.send_s == pytest.approx(req.arrival_s)
        assert all(a[0] <= b[0] for a, b in itertools.pairwise(r.chunks))
    assert all_free(sim)


def test_a_tiny_kv_pool_preempts_and_every_request_still_finishes(tmp_path: Path) -> None:
    # 10 blocks of 16 tokens: two requests of 48 + 64 tokens fit at the start (4 blocks each
    # for prompt + first token) but not at the end (7 each), so the youngest is preempted
    # and re-prefilled (prompt + its tokens so far) once the other has finished.
    serve = deployment(cpu_profile(), tmp_path, mode="disaggregated", num_prefill=1,
                       num_decode=1, decode_blocks=10, local_prefill_by_model=False)
    reqs = [SimRequest(i, 0.01 * i, 48, 64) for i in range(6)]
    sim = Simulation(serve, cpu_profile())
    res = sim.run(reqs, Slo(), Watch(0, len(reqs)))
    assert res.preemptions > 0
    assert [r.output_tokens for r in res.records] == [64] * len(reqs)
    assert all(r.ok for r in res.records)
    assert all_free(sim)


def test_impossible_ttft_objectives_are_refused_at_admission(tmp_path: Path) -> None:
    serve = deployment(cpu_profile(), tmp_path, mode="disaggregated", num_prefill=1,
                       num_decode=1)
    reqs = [SimRequest(i, 0.5 * i, 512, 8) for i in range(5)]
    res = Simulation(serve, cpu_profile()).run(reqs, Slo(ttft_ms=10.0), Watch(0, len(reqs)))
    assert len(res.records) == len(reqs)
    for r in res.records:  # a 512-token prompt takes about a second to prefill
        assert not r.ok and r.status == "RESOURCE_EXHAUSTED"
        assert "predicted TTFT" in r.error and "objective 10 ms" in r.error
    # A reachable objective admits them all.
    res = Simulation(serve, cpu_profile()).run(reqs, Slo(ttft_ms=5000.0), Watch(0, len(reqs)))
    assert all(r.ok for r in res.records)


def test_the_router_runs_on_the_simulated_clock(tmp_path: Path) -> None:
    """One request on an idle 1P1D deployment: its TTFT is the router's reserve round trip,
    the prompt's hop to the prefill worker, its prefill step and the first token's hop; each
    later token comes one decode step (at that context) after the one before."""
    profile = synthetic_profile(prefill=(0.05, 1e-4, 1e-7), decode=(0.02, 1e-3, 1e-5),
                                transfer=(0.001, 1e9))
    serve = deployment(profile, tmp_path, mode="disaggregated", num_prefill=1, num_decode=1,
                       local_prefill_by_model=False)
    n, out = 200, 6
    res = Simulation(serve, profile).run([SimRequest(0, 1.0, n, out)], Slo(), Watch(0, 1))
    (r,) = res.records
    model = CostModel(profile)
    assert r.ttft_s == pytest.approx(4 * CALL_LATENCY_S + model.prefill_step_s(n, n * n))
    times = [t for t, _ in r.chunks]
    # tokens 3..: each after a decode step of batch 1 whose context holds the tokens so far
    steps = [b - a for a, b in itertools.pairwise(times[1:])]
    expected = [model.decode_step_s(1, n + k) for k in range(2, out)]
    assert steps == pytest.approx(expected)


def test_a_run_is_deterministic(tmp_path: Path) -> None:
    serve = deployment(cpu_profile(), tmp_path, mode="disaggregated", num_prefill=1,
                       num_decode=2)
    reqs = workload(30, 0.1)
    runs = [Simulation(serve, cpu_profile()).run(reqs, Slo(2000.0, 200.0), Watch(5, 25))
            for _ in range(2)]
    assert runs[0].records == runs[1].records
    assert [r.index for r in runs[0].records] == list(range(5, 25))
    assert runs[0].backlog == runs[1].backlog and len(runs[0].backlog) == 20


def test_a_run_stops_once_the_target_is_out_of_reach(tmp_path: Path) -> None:
    serve = deployment(cpu_profile(), tmp_path, mode="colocated", num_decode=1)
    reqs = [SimRequest(i, 0.01 * i, 512, 64) for i in range(60)]  # far beyond one replica
    res = Simulation(serve, cpu_profile()).run(reqs, Slo(ttft_ms=3000.0),
                                                Watch(0, 60, max_misses=5))
    assert res.stopped_early
    assert len(res.records) < 60


def test_a_prompt_no_worker_can_hold_raises(tmp_path: Path) -> None:
    # larger than the prefill worker's pool, or than the decode worker's: the router's
    # admission refuses it (router.capacity), and the run raises
    serve = deployment(cpu_profile(), tmp_path, mode="disaggregated", num_prefill=1,
                       num_decode=1, prefill_blocks=4, local_prefill_by_model=False)
    with pytest.raises(SimulationError, match="largest prefill worker holds 4"):
        Simulation(serve, cpu_profile()).run([SimRequest(0, 0.0, 200, 4)], Slo(), Watch(0, 1))
    serve = deployment(cpu_profile(), tmp_path, mode="colocated", num_decode=1,
                       decode_blocks=4)
    with pytest.raises(SimulationError, match="largest decode worker holds 4"):
        Simulation(serve, cpu_profile()).run([SimRequest(0, 0.0, 200, 4)], Slo(), Watch(0, 1))
