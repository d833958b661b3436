"""KV channels that fail under a live CPU deployment: one prefill worker, one decode worker
(the demo model), so the one (P, D) pair is the only way a prompt's KV reaches decoding and a
pair left dead fails every request after the fault. Short lease and transfer timeouts.

- cut: while long prompts stream their KV layer by layer, the decode worker's end of the
  channel is closed through the actor (``DecodeWorker.close_channel``, the operation a drain
  uses), then, once the pair is back, the prefill worker's end (``PrefillWorker.disconnect``);
- stall: the decode worker's process is stopped (SIGSTOP) for longer than the lease and the
  transfer timeout while prompts are on their way to it, then continued (SIGCONT).

For each: every call returns before its deadline; every stream is token-exact against the
transformers reference or ended UNAVAILABLE; every block is free again on both workers; the
pair is open again (under a new channel name when the fault broke it) and new requests go
over it token-exact with no retry. Each scenario prints its figures (``channel faults:``).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
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
from pdserve_testing.streams import PROMPTS

pytestmark = pytest.mark.e2e

LEASE_S = 6.0  # the deployment's lease_timeout_s
TRANSFER_S = 3.0  # its transfer_timeout_s
STALL_S = 8.0  # past both
DEADLINE_S = 120.0  # every call's gRPC deadline
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def pair_dep(ray_cluster: None, default_gguf: Path) -> Iterator[Deployment]:
    # No prefix caching: the same long prompts are sent again and again, and the faults must
    # meet whole transfers on their way (with the cache, the decode worker would hold each
    # prompt's prefix and receive one block; tests/e2e/test_prefix_caching.py covers that).
    dep = launch(serve_config(default_gguf, "e2e-channel-faults", num_prefill=1,
                              num_decode=1, max_batch_tokens=256, lease_timeout_s=LEASE_S,
                              transfer_timeout_s=TRANSFER_S, enable_prefix_caching=False))
    yield dep
    dep.stop()


@pytest.fixture(scope="module")
def long_ids(hf_reference: HFReference) -> list[list[int]]:
    """Long prompts (a few hundred tokens: whole steps of layer-wise streaming each)."""
    text = " ".join(PROMPTS) * 4
    return [hf_reference.tokenizer(f"{i}. {text}")["input_ids"] for i in range(6)]


@pytest.fixture(scope="module")
def reference(hf_reference: HFReference, long_ids: list[list[int]]) -> list[list[int]]:
    return [hf_reference.greedy(ids, MAX_TOKENS, stop_at_eos=False) for ids in long_ids]


@dataclass
class Calls:
    """Greedy calls on threads of their own, each with a gRPC deadline: its tokens, or the
    status code it ended with."""

    client: Client
    ids: list[list[int]]
    tokens: dict[int, list[int]] = field(default_factory=dict)
    codes: dict[int, grpc.StatusCode] = field(default_factory=dict)
    started: float = 0.0

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(len(self.ids))]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        got: list[int] = []
        try:
            for r in self.client.generate(token_ids=self.ids[i], max_tokens=MAX_TOKENS,
                                          temperature=0.0, ignore_eos=True,
                                          timeout=DEADLINE_S):
                got.extend(r.token_ids)
            self.tokens[i] = got
        except grpc.RpcError as e:
            self.codes[i] = e.code()

    @property
    def running(self) -> int:
        return sum(t.is_alive() for t in self.threads)

    def join(self) -> None:
        """Every call returned before its deadline (none hung)."""
        for t in self.threads:
            t.join(max(0.0, self.started + DEADLINE_S + 10 - time.monotonic()))
        assert not self.running, "a call outlived its deadline"
        assert set(self.tokens) | set(self.codes) == set(range(len(self.ids)))


@dataclass
class Figures:
    scenario: str
    faults: int = 0
    in_flight: int = 0  # calls not yet done when the fault hit
    retried: int = 0  # attempts re-dispatched (pdserve:request_retries_total)
    exact: int = 0
    unavailable: int = 0
    recover_s: list[float] = field(default_factory=list)

    def show(self) -> None:
        print(f"channel faults: {self.scenario}: {self.faults} faults, {self.in_flight} "
              f"requests in flight, {self.retried} attempts re-dispatched, {self.exact} "
              f"token-exact, {self.unavailable} UNAVAILABLE, reopened after "
              + (", ".join(f"{s:.2f} s" for s in self.recover_s) or "- (not broken)"))


def _handles(dep: Deployment) -> tuple[Any, Any]:
    (p,) = dep.prefill.values()
    (d,) = dep.decode.values()
    return p, d


def _channel(dep: Deployment) -> str | None:
    """The pair's channel name when both ends hold it open, else None."""
    p, d = _handles(dep)
    sent = ray.get(p.channels.remote()).get("decode-0")
    got = ray.get(d.channels.remote()).get("prefill-0")
    return sent[0] if sent is not None and sent == got and sent[1] else None


def _retries(dep: Deployment) -> float:
    return sum(metric_values(dep, "pdserve:request_retries_total").values())


def _transfer_on_its_way(dep: Deployment) -> bool:
    """A lease waits for its KV on the decode worker while the prefill worker has prompts."""
    p, d = _handles(dep)
    ps, ds = ray.get([p.stats.remote(), d.stats.remote()])
    return bool(ds.num_waiting and (ps.num_running or ps.num_waiting))


def _reopened(dep: Deployment, old: str, since: float) -> float:
    """Wait until a fresh channel (not ``old``) is open at both ends; seconds since."""
    wait_for(lambda: _channel(dep) not in (None, old), 60, what="the pair reopened")
    return time.monotonic() - since


def _check(calls: Calls, reference: list[list[int]], fig: Figures) -> None:
    calls.join()
    for i, got in calls.tokens.items():
        assert got == reference[i], f"prompt {i}"
    assert set(calls.codes.values()) <= {grpc.StatusCode.UNAVAILABLE}, calls.codes
    fig.exact, fig.unavailable = len(calls.tokens), len(calls.codes)


def _after(dep: Deployment, client: Client, long_ids: list[list[int]],
           reference: list[list[int]]) -> None:
    """Blocks all free, and the pair serves again: token-exact, no retry, same channel."""
    wait_for(lambda: all_blocks_free(dep), 60, what="every block free")
    name, retries = _channel(dep), _retries(dep)
    assert name is not None
    again = Calls(client, long_ids)
    again.join()
    assert not again.codes and [again.tokens[i] for i in range(len(long_ids))] == reference
    assert _retries(dep) == retries and _channel(dep) == name
    wait_for(lambda: all_blocks_free(dep), 60, what="every block free")


def test_a_channel_cut_mid_transfer_is_reopened(
        pair_dep: Deployment, long_ids: list[list[int]], reference: list[list[int]]) -> None:
    dep = pair_dep
    p, d = _handles(dep)
    fig = Figures("cut")
    failed_before = failure_counts(dep).get("UNAVAILABLE", 0.0)
    with Client(dep.address) as client:
        for cut in (lambda: d.close_channel.remote("prefill-0"),
                    lambda: p.disconnect.remote("decode-0")):
            old, retries = _channel(dep), _retries(dep)
            assert old is not None
            calls = Calls(client, long_ids)
            wait_for(lambda: _transfer_on_its_way(dep), 60, what="a transfer on its way")
            fig.in_flight += calls.running
            t0 = time.monotonic()
            assert ray.get(cut())
            fig.faults += 1
            fig.recover_s.append(_reopened(dep, old, t0))
            exact, unavailable = fig.exact, fig.unavailable
            _check(calls, reference, fig)
            fig.exact += exact
            fig.unavailable += unavailable
            hit = int(_retries(dep) - retries)
            assert hit >= 1  # the cut hit a transfer on its way, or a lease waiting for one
            fig.retried += hit
        assert failure_counts(dep).get("UNAVAILABLE", 0.0) - failed_before == fig.unavailable
        _after(dep, client, long_ids, reference)
    fig.show()


def test_a_receiver_stalled_past_its_lease_recovers(
        pair_dep: Deployment, long_ids: list[list[int]], reference: list[list[int]]) -> None:
    dep = pair_dep
    _, d = _handles(dep)
    fig = Figures("stall")
    retries = _retries(dep)
    old = _channel(dep)
    assert old is not None
    pid = ray.get(d.pid.remote())
    with Client(dep.address) as client:
        calls = Calls(client, long_ids)
        wait_for(lambda: _transfer_on_its_way(dep), 60, what="a transfer on its way")
        fig.in_flight = calls.running
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(STALL_S)  # the transfers to it time out; its leases expire
        finally:
            os.kill(pid, signal.SIGCONT)
        t0 = time.monotonic()
        fig.faults = 1
        # A transfer to the stopped worker outlives the transfer timeout: its sender gives
        # the channel up, and the pair is reopened once the worker answers again.
        wait_for(lambda: _channel(dep) not in (None, old) or not calls.running, 60,
                 what="the pair reopened")
        if _channel(dep) != old:
            fig.recover_s.append(time.monotonic() - t0)
        _check(calls, reference, fig)
        fig.retried = int(_retries(dep) - retries)
        assert fig.retried >= 1
        _after(dep, client, long_ids, reference)
    fig.show()
