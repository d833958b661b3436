"""Colocated mode: one worker prefills (chunked, mixed into its decode steps) and decodes;
same router, API and metrics; still token-exact against transformers."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def colocated(ray_cluster: None, default_gguf: Path) -> Iterator[Deployment]:
    # A 24-token step budget: long prompts take several steps, mixed with decode tokens.
    dep = launch(serve_config(default_gguf, "e2e-colo", mode="colocated",
                              max_batch_tokens=24))
    yield dep
    dep.stop()


def test_colocated_matches_reference(colocated: Deployment, hf_reference: HFReference) -> None:
    tok = hf_reference.tokenizer
    prompts = [
        "Hello",
        "The quick brown fox jumps over the lazy dog. The quick brown fox jumps again and",
        "In 1969, the first humans landed on the Moon. The mission, called Apollo 11, was",
    ]
    ids = [tok(p)["input_ids"] for p in prompts]
    assert max(len(i) for i in ids) > 24  # chunked over several steps
    with Client(colocated.address) as client:
        assert client.server_info().mode == "colocated"
        assert client.server_info().num_prefill_workers == 0
        out = greedy_concurrently(client, ids, 12)
    for i in range(len(ids)):
        assert out[i] == hf_reference.greedy(ids[i], 12), f"prompt {i}"
    wait_for(lambda: all_blocks_free(colocated), what="blocks freed")
