"""Prefix caching end to end: a prompt that starts like an earlier one reuses its KV blocks
(on the prefill worker, and on the decode worker, which then receives only the rest), in
disaggregated and colocated mode; greedy output is token-exact with and without the hit,
the hit counters move by the tokens found, and every block is free (or evictable) after.

The prompts are built from token ids (a system prompt, then a question), so that they share
exactly the system prompt's tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pdserve.cluster.launch import Deployment, launch
from pdserve.proto.client import Client, collect
from pdserve_testing.e2e import HFReference, all_blocks_free, metric_values, serve_config, wait_for

pytestmark = pytest.mark.e2e

BS = 16
SYSTEM = ("You are a careful assistant for a public library. You answer questions about "
          "opening hours, borrowing rules, late fees, reading rooms and the catalogue, in "
          "short plain sentences, and you say so when you do not know the answer. The library "
          "has three floors, a children's corner and a quiet study hall.")
QUESTIONS = ("Question: how many books may I borrow at once? Answer:",
             "Question: is the reading room open on Sunday mornings? Answer:")


@pytest.fixture(scope="module")
def disagg(ray_cluster: None, default_gguf: Path) -> Iterator[Deployment]:
    # Every prompt on the prefill worker: with the prefix held by the decode worker, the cost
    # model would rather have it prefill the few new tokens itself (a choice tested in
    # tests/router/test_prefix_routing.py), and the transfers are what is tested here.
    dep = launch(serve_config(default_gguf, "e2e-prefix", local_prefill_by_model=False))
    yield dep
    dep.stop()


@pytest.fixture(scope="module")
def colocated(ray_cluster: None, default_gguf: Path) -> Iterator[Deployment]:
    dep = launch(serve_config(default_gguf, "e2e-prefix-colo", mode="colocated"))
    yield dep
    dep.stop()


def counters(dep: Deployment, role: str) -> tuple[float, float]:
    """(queries, hits) of the prefix cache of the workers of ``role``, in tokens."""
    labels = (("role", role),)
    return (metric_values(dep, "pdserve:prefix_cache_queries_total")[labels],
            metric_values(dep, "pdserve:prefix_cache_hits_total")[labels])


def transfer_bytes(dep: Deployment) -> float:
    return metric_values(dep, "pdserve:kv_transfer_bytes_total")[()]


def greedy(dep: Deployment, ids: list[int], n: int = 8) -> list[int]:
    with Client(dep.address) as client:
        return collect(client.generate(token_ids=ids, max_tokens=n, temperature=0.0,
                                       ignore_eos=True)).token_ids


def prompts(hf: HFReference) -> tuple[list[int], list[int], list[int]]:
    tok = hf.tokenizer
    system = tok(SYSTEM)["input_ids"]
    a = system + tok(QUESTIONS[0], add_special_tokens=False)["input_ids"]
    b = system + tok(QUESTIONS[1], add_special_tokens=False)["input_ids"]
    assert len(system) >= 3 * BS and a[:len(system)] == b[:len(system)]
    return system, a, b


def shared_tokens(x: list[int], y: list[int]) -> int:
    """Leading tokens of ``y`` a worker holding ``x``'s KV finds cached: the full blocks of
    their common prefix, never ``y``'s last token."""
    common = 0
    while common < min(len(x), len(y)) and x[common] == y[common]:
        common += 1
    full = min(common, len(x)) // BS
    return min(full, (len(y) - 1) // BS) * BS


def check_hits(dep: Deployment, hf: HFReference, role: str) -> None:
    system, a, b = prompts(hf)
    want_a = hf.greedy(a, 8, stop_at_eos=False)
    q0, h0 = counters(dep, role)
    assert greedy(dep, a) == want_a  # cold (nothing of it cached yet)
    q1, h1 = counters(dep, role)
    assert (q1 - q0, h1 - h0) == (len(a), 0)
    assert greedy(dep, a) == want_a  # the same prompt again: all but its last block cached
    q2, h2 = counters(dep, role)
    assert (q2 - q1, h2 - h1) == (len(a), (len(a) - 1) // BS * BS)
    # A second prompt sharing the system prompt: only the shared full blocks are found.
    assert greedy(dep, b) == hf.greedy(b, 8, stop_at_eos=False)
    q3, h3 = counters(dep, role)
    assert (q3 - q2, h3 - h2) == (len(b), shared_tokens(a, b))
    assert h3 - h2 >= len(system) // BS * BS - BS  # (the system prompt, in full blocks)
    wait_for(lambda: all_blocks_free(dep), what="blocks free or evictable")


def test_disaggregated_hits_are_token_exact(disagg: Deployment, hf_reference: HFReference
                                            ) -> None:
    check_hits(disagg, hf_reference, "prefill")


def test_decode_worker_receives_only_the_blocks_it_lacks(
    disagg: Deployment, hf_reference: HFReference
) -> None:
    """Its first time, a prompt's KV moves whole; the next time the decode worker holds the
    prefix (it cached the blocks it received) and only the block with the last token
    moves, while the output stays the same."""
    tok = hf_reference.tokenizer
    ids = tok("The museum across the street keeps a collection of old maps, clocks and "
              "scientific instruments; its guides explain how each one was made and used, "
              "and may I bring my dog inside?")["input_ids"]
    assert len(ids) > 2 * BS
    want = hf_reference.greedy(ids, 8, stop_at_eos=False)
    before = transfer_bytes(disagg)
    assert greedy(disagg, ids) == want
    wait_for(lambda: transfer_bytes(disagg) > before, what="the first transfer")
    whole = transfer_bytes(disagg) - before
    before = transfer_bytes(disagg)
    assert greedy(disagg, ids) == want
    wait_for(lambda: transfer_bytes(disagg) > before, what="the second transfer")
    blocks = -(-len(ids) // BS)
    cached = (len(ids) - 1) // BS
    assert transfer_bytes(disagg) - before == whole * (blocks - cached) / blocks
    wait_for(lambda: all_blocks_free(disagg), what="blocks free or evictable")


def test_colocated_hits_are_token_exact(colocated: Deployment, hf_reference: HFReference
                                        ) -> None:
    check_hits(colocated, hf_reference, "decode")
    # The next turn of a chat: prompt + answer + a new question finds the answer's full
    # blocks too (the decode worker cached the blocks it decoded).
    _, a, _ = prompts(hf_reference)
    answer = greedy(colocated, a, 24)
    turn = a + answer + hf_reference.tokenizer(" Thanks. And DVDs?",
                                               add_special_tokens=False)["input_ids"]
    q0, h0 = counters(colocated, "decode")
    assert greedy(colocated, turn) == hf_reference.greedy(turn, 8, stop_at_eos=False)
    q1, h1 = counters(colocated, "decode")
    # Cached: the full blocks of prompt + answer but its last token (never stored).
    assert (q1 - q0, h1 - h0) == (len(turn), (len(a) + len(answer) - 1) // BS * BS)
    wait_for(lambda: all_blocks_free(colocated), what="blocks free or evictable")
