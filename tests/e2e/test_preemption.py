"""A decode pool too small for its batch: sequences are preempted, re-prefilled (prompt +
generated tokens) and their streams go on without a gap, still token-exact."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pdserve.cluster.launch import Deployment, launch
from pdserve.proto.client import Client, collect
from pdserve_testing.e2e import (
    HFReference,
    all_blocks_free,
    metric_values,
    openai_penalties,
    run_concurrently,
    serve_config,
    wait_for,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny(ray_cluster: None, default_gguf: Path) -> Iterator[Deployment]:
    # 8 blocks of 16 tokens: any two of the sequences below (~14 + 60 tokens, 5 blocks
    # each) overlapping in time cannot both fit, whatever the arrival skew.
    dep = launch(serve_config(default_gguf, "e2e-tiny", decode_blocks=8, max_waiting=4))
    yield dep
    dep.stop()


def test_preempted_sequences_still_match_reference(
    tiny: Deployment, hf_reference: HFReference
) -> None:
    tok = hf_reference.tokenizer
    prompts = [
        "The history of the printing press begins in the fifteenth century, when",
        "A recipe for a simple tomato soup: first, take four ripe tomatoes and",
        "The three laws of motion, as described by Isaac Newton, state that",
    ]
    ids = [tok(p)["input_ids"] for p in prompts]
    n = 60
    out: dict[int, list[int]] = {}
    with Client(tiny.address) as client:
        def run(i: int) -> None:
            out[i] = collect(client.generate(token_ids=ids[i], max_tokens=n, temperature=0.0,
                                             ignore_eos=True)).token_ids

        run_concurrently(run, 3)
    for i in range(3):
        assert out[i] == hf_reference.greedy(ids[i], n, stop_at_eos=False), f"prompt {i}"
    body = urllib.request.urlopen(
        f"http://127.0.0.1:{tiny.metrics_port}/metrics", timeout=5).read().decode()
    preemptions = [float(line.split()[-1]) for line in body.splitlines()
                   if line.startswith("pdserve:num_preemptions_total")]
    assert preemptions and preemptions[0] >= 1, "the pool was meant to force a preemption"
    wait_for(lambda: all_blocks_free(tiny), what="blocks freed")


def test_penalized_sequences_are_preempted_without_a_difference(
    tiny: Deployment, hf_reference: HFReference
) -> None:
    """The penalties count prompt and output tokens the same way after a re-prefill (the
    decode worker's history, the prefill task's prompt + generated tokens)."""
    tok = hf_reference.tokenizer
    prompts = [
        "The history of the printing press begins in the fifteenth century, when",
        "A recipe for a simple tomato soup: first, take four ripe tomatoes and",
        "The three laws of motion, as described by Isaac Newton, state that",
    ]
    ids = [tok(p)["input_ids"] for p in prompts]
    n = 60
    before = metric_values(tiny, "pdserve:num_preemptions_total").get((), 0.0)
    out: dict[int, list[int]] = {}
    with Client(tiny.address) as client:
        def run(i: int) -> None:
            out[i] = collect(client.generate(
                token_ids=ids[i], max_tokens=n, min_tokens=n, temperature=0.0,
                repetition_penalty=1.2, frequency_penalty=0.3)).token_ids

        run_concurrently(run, 3)
    for i in range(3):
        want = hf_reference.generate(ids[i], n, min_new_tokens=n, repetition_penalty=1.2,
                                     logits_processor=openai_penalties(len(ids[i]), 0.0, 0.3))
        assert out[i] == want, f"prompt {i}"
    after = metric_values(tiny, "pdserve:num_preemptions_total").get((), 0.0)
    assert after > before, "the pool was meant to force a preemption"
    wait_for(lambda: all_blocks_free(tiny), what="blocks freed")


def test_full_queue_is_resource_exhausted(tiny: Deployment) -> None:
    codes: list[grpc.StatusCode | None] = []
    with Client(tiny.address) as client:
        def run(i: int) -> None:
            try:
                collect(client.generate(text="Write about mountains " * 20, max_tokens=40,
                                        temperature=0.0, ignore_eos=True))
                codes.append(None)
            except grpc.RpcError as e:
                codes.append(e.code())

        run_concurrently(run, 12)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert None in codes  # the admitted ones complete
    assert set(codes) <= {None, grpc.StatusCode.RESOURCE_EXHAUSTED}
    wait_for(lambda: all_blocks_free(tiny), what="blocks freed")
