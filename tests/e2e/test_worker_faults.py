"""Workers that die: the router learns of it as soon as Ray does (its liveness watch on
each worker fails), stops placing on the dead worker, and re-dispatches every request whose
attempt ran there (prompt and the tokens already streamed, re-prefilled on a survivor), so
every stream completes token-exact against the transformers reference, with no request
failed and no block left held on the survivors. Then the loop ``pdserve serve`` runs without
--autoscale replaces the dead worker (the pool back at its size).

- a decode worker's process is SIGKILLed mid-stream;
- a prefill worker's process is SIGKILLed while it holds prompts (long ones, chunked)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from pdserve.cluster.launch import Deployment, launch
from pdserve.cluster.scaling import Autoscaler, keeper
from pdserve.proto.client import Client
from pdserve_testing.e2e import HFReference, failure_counts, serve_config, wait_for
from pdserve_testing.streams import PROMPTS, Streams

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def faulty(ray_cluster: None, default_gguf: Path) -> Iterator[Deployment]:
    dep = launch(serve_config(default_gguf, "e2e-faults", num_prefill=2, num_decode=2))
    yield dep
    dep.stop()


def _kill(dep: Deployment, name: str) -> float:
    """SIGKILL worker ``name``'s process. Returns when."""
    handle = {**dep.prefill, **dep.decode}[name]
    os.kill(ray.get(handle.pid.remote()), signal.SIGKILL)
    return time.monotonic()


def _replaced(dep: Deployment, name: str) -> str:
    """What ``pdserve serve`` runs without --autoscale holds the pool at its size: the dead
    worker's handle goes and a new worker starts and joins. Returns the new one's name."""
    scaler = Autoscaler.for_deployment(dep, keeper(dep.cfg))
    scaler.step()
    assert ("lost", name) in [(e.kind, e.name) for e in scaler.events]
    (started,) = [e.name for e in scaler.events if e.kind == "start"]
    wait_for(lambda: scaler.step() is not None and any(
        e.kind == "serving" for e in scaler.events), 120, what=f"{started} serving")
    assert name not in {*dep.prefill, *dep.decode} and started in {*dep.prefill, *dep.decode}
    return started


def _epochs(decode: Any) -> set[int]:
    """The epochs in the names of a decode worker's open channels
    (``{prefill}@{decode}:e{epoch}.{nonce}``)."""
    names = [name for name, is_open in ray.get(decode.channels.remote()).values() if is_open]
    assert names
    return {int(n.split(":e", 1)[1].split(".", 1)[0]) for n in names}


def _serving(dep: Deployment) -> dict[str, int]:
    return dict(ray.get(dep.router.load_snapshot.remote()).serving)


def _survivors_free(dep: Deployment) -> bool:
    stats: list[Any] = ray.get([h.stats.remote() for h in [*dep.prefill.values(),
                                                          *dep.decode.values()]])
    return all(s.num_free_blocks == s.num_blocks for s in stats)


def test_a_killed_decode_worker_s_streams_go_on_elsewhere(
        faulty: Deployment, hf_reference: HFReference) -> None:
    tok = hf_reference.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    n = 80
    with Client(faulty.address) as client:
        streams = Streams(client, ids, n, min_tokens=4)
        streams.wait_started()
        holding = [s.worker for s in faulty.worker_stats()
                   if s.role == "decode" and s.num_running]
        assert holding, "the streams were meant to be decoding"
        old_epochs = _epochs(faulty.decode[holding[0]])
        killed = _kill(faulty, holding[0])
        wait_for(lambda: _serving(faulty)["decode"] == 1, 30, what="the router noticing")
        print(f"router noticed the decode worker gone in {time.monotonic() - killed:.2f} s")
        out = streams.join()
    for i, got in out.items():
        assert got == hf_reference.greedy(ids[i], n, stop_at_eos=False), f"prompt {i}"
    assert not failure_counts(faulty)
    new = _replaced(faulty, holding[0])
    assert new.startswith("decode-")
    assert _serving(faulty)["decode"] == 2
    # The replacement is a new incarnation: its channels carry an epoch of their own.
    new_epochs = _epochs(faulty.decode[new])
    assert len(old_epochs) == len(new_epochs) == 1 and min(new_epochs) > max(old_epochs)
    wait_for(lambda: _survivors_free(faulty), what="blocks freed on the survivors")


def test_a_killed_prefill_worker_s_prompts_are_prefilled_elsewhere(
        faulty: Deployment, hf_reference: HFReference) -> None:
    tok = hf_reference.tokenizer
    long = " ".join(PROMPTS) * 3  # hundreds of tokens: several 64-token chunks each
    ids = [tok(f"{i}. {long}")["input_ids"] for i in range(4)]
    n = 8
    with Client(faulty.address) as client:
        streams = Streams(client, ids, n, min_tokens=0)
        # The victim is a prefill worker holding prompts: placement may give them all to
        # one worker (its cost model may rate the other slower after the first test).
        holding: list[str] = []

        def prompts_held() -> bool:
            holding[:] = [s.worker for s in faulty.worker_stats()
                          if s.role == "prefill" and s.num_running + s.num_waiting]
            return bool(holding)

        wait_for(prompts_held, 30, what="prompts on a prefill worker")
        victim = holding[0]
        killed = _kill(faulty, victim)
        wait_for(lambda: _serving(faulty)["prefill"] == 1, 30, what="the router noticing")
        print(f"router noticed the prefill worker gone in {time.monotonic() - killed:.2f} s")
        out = streams.join()
    for i, got in out.items():
        assert got == hf_reference.greedy(ids[i], n, stop_at_eos=False), f"prompt {i}"
    assert not failure_counts(faulty)
    assert _replaced(faulty, victim).startswith("prefill-")
    assert _serving(faulty)["prefill"] == 2
    wait_for(lambda: _survivors_free(faulty), what="blocks freed on the survivors")
