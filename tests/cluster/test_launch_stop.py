"""Deployment.stop() against stand-in actors on a local Ray: every worker is stopped at once,
so workers whose teardown waits for their peers (a clean NCCL channel teardown does) stop
together, and a worker that hangs costs the timeout once."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.cloudpickle

from pdserve.cluster.config import ServeConfig
from pdserve.cluster.launch import Deployment, job_runtime_env


class StubRouter:
    def stop(self) -> None:
        pass


class PeerWorker:
    """``shutdown()`` leaves a mark and returns once every peer left one too (each KV
    channel's two ends tear down together); with ``hang`` it never returns."""

    def __init__(self, marks: str, name: str, peers: list[str], hang: bool = False) -> None:
        self.marks, self.name, self.peers, self.hang = Path(marks), name, peers, hang

    def shutdown(self) -> None:
        (self.marks / self.name).touch()
        if self.hang:
            time.sleep(3600)
        deadline = time.monotonic() + 60.0
        while not all((self.marks / p).exists() for p in self.peers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: a peer never shut down")
            time.sleep(0.01)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # The stand-ins travel by value: Ray's workers cannot import this test module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = not ray.is_initialized()
    if started:
        ray.init(namespace="pdserve-tests", include_dashboard=False, num_cpus=4,
                 object_store_memory=100 * 1024 * 1024, log_to_driver=False,
                 runtime_env=job_runtime_env())
    yield
    if started:
        ray.shutdown()


def deployment(marks: Path, num_prefill: int, num_decode: int,
               hang: tuple[str, ...] = ()) -> Deployment:
    prefill = [f"prefill-{i}" for i in range(num_prefill)]
    decode = [f"decode-{i}" for i in range(num_decode)]

    def actor(name: str, peers: list[str]) -> Any:
        return ray.remote(PeerWorker).options(num_cpus=0).remote(
            str(marks), name, peers, name in hang)

    router = ray.remote(StubRouter).options(num_cpus=0).remote()
    workers = {name: actor(name, decode if name in prefill else prefill)
               for name in [*prefill, *decode]}
    # Every actor up before the test times stop(): on a loaded machine an actor's start can
    # take longer than the stop timeout, and that is not what these tests measure.
    ray.get([h.__ray_ready__.remote() for h in [router, *workers.values()]])
    return Deployment(
        ServeConfig(), router, [],
        {p: workers[p] for p in prefill}, {d: workers[d] for d in decode},
        port=0, metrics_port=0, started_ray=False,
    )


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_workers_stop_together(local_ray: None, tmp_path: Path,
                               caplog: pytest.LogCaptureFixture) -> None:
    dep = deployment(tmp_path, num_prefill=2, num_decode=2)
    t0 = time.monotonic()
    dep.stop(timeout_s=8.0)  # one worker after the other: each prefill worker timed out
    assert time.monotonic() - t0 < 6.0
    assert errors(caplog) == []


def test_a_hung_worker_costs_the_timeout_once(local_ray: None, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    dep = deployment(tmp_path, num_prefill=2, num_decode=1, hang=("prefill-0", "prefill-1"))
    t0 = time.monotonic()
    dep.stop(timeout_s=2.0)
    assert time.monotonic() - t0 < 6.0
    assert sorted(errors(caplog)) == [f"worker prefill-{i} did not stop within 2 s"
                                      for i in range(2)]
    assert (tmp_path / "decode-0").exists()
    with pytest.raises(ray.exceptions.RayActorError):  # killed all the same
        ray.get(dep.prefill["prefill-0"].shutdown.remote(), timeout=30)
