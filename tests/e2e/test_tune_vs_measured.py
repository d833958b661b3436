"""`pdserve tune`'s simulation against a real run: a colocated replica of the demo model on this
CPU, loaded by `pdserve bench` at three rates, and the same requests (lengths, arrival times,
objectives) simulated from a profile `pdserve profile` measured here just before.

The tolerance of this small version is 30 points of attainment at every rate, and the
measurement must put the knee where the prediction does: the lowest rates are met, and the
highest rate is the first of a ladder at which the simulation predicts at most 80% attainment
(the machines CI runs on differ in speed: a fixed top rate of 14 req/s was past the knee on
one and short of it on another). Each rate counts 24 requests (one is about 4 points); the
profile is a --quick one, and the linear decode fit under-predicts the small batches this
replica runs (batch 4-16 at short contexts) by 20-35% on this CPU, so the simulated replica is
faster than the real one and its attainment above the knee higher (by 8 to 25 points in the
runs made while writing this test); and the worker shares the machine's two cores with the
router, the frontend and the load generator, none of which the profile times. A simulation
that batched, queued or admitted differently from the real router misses by more than that
(one that serves a request at a time predicts 25% at 5 req/s, where the replica meets 80-90%).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pdserve.cluster.bench.config import BenchConfig
from pdserve.cluster.bench.records import Slo
from pdserve.cluster.bench.report import make_report
from pdserve.cluster.bench.serve import run_bench
from pdserve.cluster.cli import main
from pdserve.cluster.launch import Deployment, launch
from pdserve.cluster.tune.sim import Simulation, Watch
from pdserve.cluster.tune.workload import Workload
from pdserve.router.cost_model import Profile
from pdserve_testing.e2e import serve_config

pytestmark = pytest.mark.e2e

LOW_RATES = (2.0, 4.0)
TOP_RATES = (8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0)  # the ladder the top rate comes from
OVERLOADED = 0.8  # the predicted attainment that marks a rate as past the knee
NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 24, 64, 16
# Objectives clear of the step times (a TPOT objective near one mixed step's time turns on
# whether the router lets a prompt join a running batch, which a few percent decide).
SLO = Slo(ttft_ms=2500.0, tpot_ms=500.0)
TOLERANCE = 0.30


@pytest.fixture(scope="module")
def measured_profile(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quick profile of this machine, with the worker settings the deployment runs."""
    path = tmp_path_factory.mktemp("tune") / "cpu.json"
    threads = torch.get_num_threads()  # the profile's runner sets this process's
    try:
        assert main(["profile", "--quick", "--no-transfer", "--model", str(default_gguf),
                     "--torch-threads", "1", "--max-batch-tokens", "64", "--decode-blocks",
                     "256", "--out", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.fixture(scope="module")
def replica(ray_cluster: None, default_gguf: Path,
            measured_profile: Path) -> Iterator[Deployment]:
    # Without prefix caching: every rate sends the same prompts (one seed), which a cache
    # would serve from the second rate on, and the simulator does not model the cache.
    dep = launch(serve_config(default_gguf, "e2e-tune", mode="colocated", num_decode=1,
                              profile=str(measured_profile), enable_prefix_caching=False))
    yield dep
    dep.stop()


def test_predicted_attainment_is_within_the_tolerance_of_measured(
        replica: Deployment, default_gguf: Path, measured_profile: Path) -> None:
    serve = serve_config(default_gguf, "e2e-tune", mode="colocated", num_decode=1,
                         profile=str(measured_profile), enable_prefix_caching=False)
    profile = Profile.load(measured_profile)

    def bench_config(rates: tuple[float, ...]) -> BenchConfig:
        # A short window of exactly NUM_PROMPTS requests per rate, all counted (smoke).
        return BenchConfig(server=replica.address, min_requests=NUM_PROMPTS,
                           min_duration_s=0.01, duration_factor=0.0, warmup_fraction=0.0,
                           smoke=True, input_len=INPUT_LEN, output_len=OUTPUT_LEN,
                           request_rates=rates, slo=SLO, progress=False)

    def predict(rate: float) -> float:
        # The very requests bench sends: the same lengths (seed) and arrival times (rate).
        workload = Workload(bench_config((rate,)), num_prompts=NUM_PROMPTS)
        res = Simulation(serve, profile).run(workload.requests(rate, NUM_PROMPTS), SLO,
                                             Watch(0, NUM_PROMPTS))
        return make_report("tune", rate, 1.0, None, res.records, SLO).attainment

    predicted = {rate: predict(rate) for rate in LOW_RATES}
    ladder = ((r, predict(r)) for r in TOP_RATES)
    top, predicted_top = next(((r, a) for r, a in ladder if a <= OVERLOADED), (0.0, 1.0))
    assert top, f"the simulation meets the SLO even at {TOP_RATES[-1]} req/s"
    predicted[top] = predicted_top
    measured = run_bench(bench_config((*LOW_RATES, top)))
    rows = [(r.request_rate, r.attainment, predicted[r.request_rate])
            for r in measured.reports]
    print("rate, measured, predicted attainment:", rows)
    assert all(sim >= 0.9 for _, _, sim in rows[:-1]), f"predicted misses at low rates: {rows}"
    assert rows[0][1] >= 0.9, f"the replica misses the SLO at {rows[0][0]} req/s: {rows}"
    assert rows[-1][1] < 0.9, f"the replica meets the SLO where it is predicted not to: {rows}"
    for rate, real, sim in rows:
        assert abs(real - sim) <= TOLERANCE, f"at {rate} req/s: measured {real}, predicted {sim}"
