"""Pools that change while they serve: workers join a running deployment (channels to every
peer opened, handshake included) and leave it by draining, with every stream complete and
token-exact against the transformers reference, and no request failed.

- grow: a prefill and a decode worker join while streams run; the joiners serve after.
- drain: a decode worker with streams on it drains; they finish there first.
- migrate: a decode worker drains with no time to finish; its streams move (re-prefilled
  with the tokens already streamed) and go on without a gap or a repeated token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from pdserve.cluster.launch import Deployment, launch
from pdserve.proto.client import Client
from pdserve_testing.e2e import (
    HFReference,
    all_blocks_free,
    failure_counts,
    metric_values,
    serve_config,
    wait_for,
)
from pdserve_testing.streams import PROMPTS, Streams

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def elastic(ray_cluster: None, default_gguf: Path) -> Iterator[Deployment]:
    dep = launch(serve_config(default_gguf, "e2e-elastic"))
    yield dep
    dep.stop()


@pytest.fixture(scope="module")
def ids(hf_reference: HFReference) -> list[list[int]]:
    return [hf_reference.tokenizer(p)["input_ids"] for p in PROMPTS]


def _check(out: dict[int, list[int]], ids: list[list[int]], n: int,
           ref: HFReference) -> None:
    for i, got in out.items():
        assert got == ref.greedy(ids[i], n, stop_at_eos=False), f"prompt {i}"


def _holding(dep: Deployment) -> list[str]:
    """Decode workers with running sequences."""
    return [s.worker for s in dep.worker_stats() if s.role == "decode" and s.num_running]


def test_workers_join_while_serving(elastic: Deployment, ids: list[list[int]],
                                    hf_reference: HFReference) -> None:
    with Client(elastic.address) as client:
        streams = Streams(client, ids, 24)
        assert elastic.add_worker("decode") == "decode-1"
        assert elastic.add_worker("prefill") == "prefill-1"
        _check(streams.join(), ids, 24, hf_reference)
        endpoints = ray.get(elastic.router.channel_endpoints.remote())
        assert set(endpoints) == {f"prefill-{p}->decode-{d}" for p in (0, 1) for d in (0, 1)}
        after = Streams(client, ids * 2, 16)
        _check(after.join(), ids * 2, 16, hf_reference)
    workers = {dict(k)["worker"] for k in metric_values(elastic, "pdserve:kv_cache_usage_perc")}
    assert "decode-1" in workers  # it reported decode steps: it served
    snap = ray.get(elastic.router.load_snapshot.remote())
    assert snap.serving == {"prefill": 2, "decode": 2}


def test_drained_worker_finishes_its_streams(elastic: Deployment, ids: list[list[int]],
                                             hf_reference: HFReference) -> None:
    with Client(elastic.address) as client:
        streams = Streams(client, ids, 48)
        streams.wait_started()
        holding = _holding(elastic)
        victim = holding[0] if holding else "decode-0"
        drained = elastic.remove_worker(victim, timeout_s=300.0)
        _check(streams.join(), ids, 48, hf_reference)
    assert drained.name == victim and drained.role == "decode" and drained.migrated == 0
    assert victim not in elastic.decode
    prefill = elastic.remove_worker("prefill-0", timeout_s=300.0)
    assert prefill.migrated == 0 and list(elastic.prefill) == ["prefill-1"]
    with pytest.raises(ray.exceptions.RayTaskError, match="last serving prefill worker"):
        elastic.remove_worker("prefill-1")
    assert not failure_counts(elastic)


def test_migrated_streams_go_on_token_exact(elastic: Deployment, ids: list[list[int]],
                                            hf_reference: HFReference) -> None:
    elastic.add_worker("decode")
    n = 120
    with Client(elastic.address) as client:
        streams = Streams(client, ids, n, min_tokens=4)
        streams.wait_started()
        holding = _holding(elastic)
        assert holding, "the streams were meant to be running"
        drained = elastic.remove_worker(holding[0], timeout_s=0.0)
        _check(streams.join(), ids, n, hf_reference)
    assert drained.migrated >= 1
    assert len(elastic.decode) == 1 and holding[0] not in elastic.decode
    assert not failure_counts(elastic)
    wait_for(lambda: all_blocks_free(elastic), what="blocks freed on the workers left")
