"""Conditional disaggregation: in disaggregated mode, prompts of at most
``local_prefill_max_tokens`` tokens are prefilled by their decode worker, longer ones by the
prefill worker (KV over the channel); both kinds stream token-exact output, side by side."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdserve.cluster.launch import Deployment, launch
from pdserve.proto.client import Client
from pdserve_testing.e2e import (
    HFReference,
    all_blocks_free,
    greedy_concurrently,
    serve_config,
    wait_for,
)

pytestmark = pytest.mark.e2e

LOCAL_MAX = 16


@pytest.fixture(scope="module")
def conditional(ray_cluster: None, default_gguf: Path) -> Iterator[Deployment]:
    # A one-block step budget: the long prompts are chunked on the prefill worker, and a
    # local prompt shares its decode worker's steps with sequences whose KV came over the
    # channel (chunked too when their decode tokens leave it less than its length).
    dep = launch(serve_config(default_gguf, "e2e-cond", local_prefill_max_tokens=LOCAL_MAX,
                              max_batch_tokens=16))
    yield dep
    dep.stop()


def scrape(dep: Deployment, name: str) -> float:
    body = urllib.request.urlopen(
        f"http://127.0.0.1:{dep.metrics_port}/metrics", timeout=5).read().decode()
    values = [float(line.split()[-1]) for line in body.splitlines()
              if line.startswith(f"{name} ")]
    assert len(values) == 1, name
    return values[0]


def test_short_prompts_local_long_prompts_remote(
    conditional: Deployment, hf_reference: HFReference
) -> None:
    tok = hf_reference.tokenizer
    prompts = [
        "Hello",
        "Q: What is 12 times 12?\nA:",
        "The quick brown fox jumps over the lazy dog. The quick brown fox jumps again and",
        "In 1969, the first humans landed on the Moon. The mission, called Apollo 11, was",
    ]
    ids = [tok(p)["input_ids"] for p in prompts]
    local = [i for i, p in enumerate(ids) if len(p) <= LOCAL_MAX]
    # 1 and 15 tokens (+ the first token's slot: one full block) local; 17 and 25 remote.
    assert sorted(len(p) for p in ids) == [1, 15, 17, 25] and len(local) == 2
    with Client(conditional.address) as client:
        assert client.server_info().num_prefill_workers == 1
        out = greedy_concurrently(client, ids, 12)
    for i in range(len(ids)):
        assert out[i] == hf_reference.greedy(ids[i], 12), f"prompt {i}"
    # Every prompt was prefilled once: the short ones locally, the long ones remotely (one
    # KV transfer each).
    assert scrape(conditional, "pdserve:local_prefills_total") == len(local)
    assert scrape(conditional, "pdserve:kv_transfer_seconds_count") == len(ids) - len(local)
    assert scrape(conditional, "pdserve:request_retries_total") == 0
    wait_for(lambda: all_blocks_free(conditional), what="blocks freed")
