"""SLO scheduling end to end: admission refuses what the cost model says cannot meet its
TTFT objective (naming the prediction) while a feasible request beside it completes, and
waiting requests are served by TTFT deadline, not by arrival."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pdserve.cluster.launch import Deployment, launch
from pdserve.proto.client import Client, collect
from pdserve_testing.e2e import failure_counts, metric_values, serve_config, wait_for

pytestmark = pytest.mark.e2e


def write_profile(path: Path) -> Path:
    """A profile of plausible CPU costs for the embedded model: 20 ms + 0.2 ms a token per
    prefill step, 30 ms + 0.5 ms a sequence per decode step."""
    path.write_text(json.dumps({
        "device": "cpu", "model": "test", "dtype": "float32", "block_size": 16,
        "max_batch_tokens": 64, "kv_bytes_per_token": 4096,
        "prefill": {"a": 0.02, "b": 2e-4, "c": 0.0},
        "decode": {"a": 0.03, "b": 5e-4, "c": 0.0},
        "transfer": {"latency_s": 1e-3, "bytes_per_s": 1e9},
        "samples": {},
    }))
    return path


@pytest.fixture(scope="module")
def one_seat(ray_cluster: None, default_gguf: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # One decode seat: requests wait in the router's queue, where the order shows.
    profile = write_profile(tmp_path_factory.mktemp("slo") / "profile.json")
    dep = launch(serve_config(default_gguf, "e2e-slo", mode="colocated", max_num_seqs=1,
                              profile=str(profile)))
    yield dep
    dep.stop()


def test_an_impossible_ttft_is_refused_naming_the_prediction(one_seat: Deployment) -> None:
    with Client(one_seat.address) as client:
        assert client.server_info().scheduler == "slo"
        ok = client.generate(text="Hello there", max_tokens=4, ttft_ms=60_000)
        with pytest.raises(grpc.RpcError) as e:
            collect(client.generate(text="Hello there", max_tokens=4, ttft_ms=1))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "predicted TTFT" in (e.value.details() or "")
        assert "exceeds the objective 1 ms" in (e.value.details() or "")
        done = collect(ok)
        assert done.finish_reason == "length" and len(done.token_ids) == 4
    # The refusal is counted; the one that finished within its objective is goodput.
    assert failure_counts(one_seat).get("RESOURCE_EXHAUSTED", 0) >= 1
    goodput = metric_values(one_seat, "pdserve:goodput_requests_total")
    assert goodput[(("slo_class", "default"),)] >= 1
    attained = metric_values(one_seat, "pdserve:slo_attained_total")
    assert attained[(("phase", "ttft"), ("slo_class", "default"))] >= 1
    # The calibrated cost model predicted its TTFT: the error is on record.
    assert metric_values(one_seat, "pdserve:ttft_prediction_ratio_count")[()] >= 1


def test_waiting_requests_are_served_by_ttft_deadline(one_seat: Deployment) -> None:
    started: dict[str, float] = {}
    lock = threading.Lock()
    with Client(one_seat.address) as client:
        # The seat is taken; three requests queue behind it, the loosest objective first.
        busy = client.generate(text="Count to one hundred:", max_tokens=48, ignore_eos=True)
        first = next(iter(busy))  # the busy request holds the seat now
        assert first.token_ids

        def run(name: str, ttft_ms: float) -> None:
            stream = client.generate(text=f"Request {name}", max_tokens=2, ttft_ms=ttft_ms,
                                     request_id=name)
            for resp in stream:
                if resp.token_ids:
                    with lock:
                        started.setdefault(name, time.monotonic())

        threads = []
        for name, ttft in (("loose", 300_000), ("tight", 100_000), ("middle", 200_000)):
            t = threading.Thread(target=run, args=(name, ttft))
            t.start()
            threads.append(t)
            n = len(threads)
            wait_for(lambda n=n: waiting(one_seat) >= n, what=f"{name} queued")
        collect(busy)
        for t in threads:
            t.join(timeout=120)
    assert sorted(started, key=started.__getitem__) == ["tight", "middle", "loose"]


def waiting(dep: Deployment) -> int:
    """Requests waiting in the router's queue, from its /metrics."""
    body = urllib.request.urlopen(
        f"http://127.0.0.1:{dep.metrics_port}/metrics", timeout=5).read().decode()
    line = next(ln for ln in body.splitlines() if ln.startswith("pdserve:num_requests_waiting "))
    return int(float(line.split()[1]))
