"""Several gRPC frontends on one port: client connections spread over them, and a stream
served by either is the same stream (tokens, text, end) as with one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import ray

from pdserve.cluster.launch import Deployment, launch
from pdserve.proto.client import Client, collect
from pdserve_testing.e2e import HFReference, all_blocks_free, serve_config, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two_frontends(ray_cluster: None, default_gguf: Path) -> Iterator[Deployment]:
    dep = launch(serve_config(default_gguf, "e2e-fe", mode="colocated", frontends=2))
    yield dep
    dep.stop()


def _own_connection(address: str) -> Client:
    return Client(address, own_connection=True)


def test_connections_spread_over_frontends_and_streams_match_reference(
    two_frontends: Deployment, hf_reference: HFReference
) -> None:
    ids = hf_reference.tokenizer("The capital of France is")["input_ids"]
    want = hf_reference.greedy(ids, 8)
    served = [0, 0]
    texts = set()
    # The kernel picks a listener per connection by a hash: keep connecting until both
    # frontends have served (the chance that 64 connections all hash alike is 2**-63).
    for _ in range(64):
        with _own_connection(two_frontends.address) as client:
            assert client.health() == "SERVING"
            out = collect(client.generate(token_ids=ids, max_tokens=8, temperature=0.0))
            assert out.token_ids == want
            assert out.finish_reason == "length"
            assert out.usage.completion_tokens == 8
            texts.add(out.text)
        served = ray.get([f.num_served.remote() for f in two_frontends.frontends])
        if min(served) > 0:
            break
    assert min(served) > 0, f"one frontend served every connection: {served}"
    assert len(texts) == 1 and texts != {""}, texts
    wait_for(lambda: all_blocks_free(two_frontends), what="blocks freed")


def test_each_frontend_refuses_bad_input_and_reports_the_deployment(
    two_frontends: Deployment,
) -> None:
    for _ in range(8):
        with _own_connection(two_frontends.address) as client:
            info = client.server_info()
            assert (info.mode, info.num_decode_workers) == ("colocated", 1)
            with pytest.raises(grpc.RpcError) as e:
                collect(client.generate(token_ids=[1, 2], max_tokens=0))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_tokens" in (e.value.details() or "")
