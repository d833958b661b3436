"""1,000 Generate streams open at once against the CPU demo: every one completes OK with
exactly the tokens it asked for, and the deployment is idle and whole after.

The deployment has room for all of them waiting (``max_waiting``) and a decode batch of
256; each call has a deadline of several minutes, a guard against a hang, not a
performance bound (the run's wall time and tokens/s are printed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pdserve.cluster.launch import Deployment, launch
from pdserve.proto.client import AsyncClient, Completion, acollect
from pdserve_testing.e2e import all_blocks_free, failure_counts, serve_config, wait_for

pytestmark = pytest.mark.e2e

STREAMS = 1000
CONNECTIONS = 4  # client channels of their own, the streams spread over them
DEADLINE_S = 600.0  # per call: a hang guard


@pytest.fixture(scope="module")
def roomy(ray_cluster: None, default_gguf: Path) -> Iterator[Deployment]:
    dep = launch(serve_config(default_gguf, "e2e-many", max_waiting=STREAMS,
                              max_num_seqs=256, max_batch_tokens=512, prefill_blocks=512,
                              decode_blocks=512))
    yield dep
    dep.stop()


def _max_tokens(i: int) -> int:
    return 4 + i % 5  # 4 to 8


async def _all_at_once(address: str) -> list[Completion | BaseException]:
    clients = [AsyncClient(address, own_connection=True) for _ in range(CONNECTIONS)]
    try:
        calls = [acollect(clients[i % CONNECTIONS].generate(
            text=f"Count to {i}:", max_tokens=_max_tokens(i), temperature=0.0,
            ignore_eos=True, timeout=DEADLINE_S)) for i in range(STREAMS)]
        return await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def test_a_thousand_concurrent_streams_all_complete(roomy: Deployment) -> None:
    t0 = time.monotonic()
    out = asyncio.run(_all_at_once(roomy.address))
    wall = time.monotonic() - t0
    errors = [(i, o) for i, o in enumerate(out) if isinstance(o, BaseException)]
    assert not errors, f"{len(errors)} streams failed, e.g. {errors[:3]}"
    tokens = 0
    for i, done in enumerate(out):
        assert isinstance(done, Completion)
        assert (done.finish_reason, len(done.token_ids), done.usage.completion_tokens) == \
            ("length", _max_tokens(i), _max_tokens(i)), i
        tokens += len(done.token_ids)
    ttft = sorted(o.timing.ttft_s for o in out if isinstance(o, Completion))
    print(f"{STREAMS} streams, {tokens} tokens in {wall:.1f} s: {tokens / wall:.0f} tokens/s, "
          f"{STREAMS / wall:.0f} requests/s; TTFT p50 {ttft[len(ttft) // 2]:.2f} s, "
          f"max {ttft[-1]:.2f} s")
    assert not failure_counts(roomy)
    wait_for(lambda: all_blocks_free(roomy), what="blocks freed after 1,000 streams")


def test_the_deployment_serves_after_the_burst(roomy: Deployment) -> None:
    async def one() -> Completion:
        async with AsyncClient(roomy.address) as c:
            return await acollect(c.generate(text="Hello", max_tokens=3, temperature=0.0,
                                             ignore_eos=True, timeout=60))

    try:
        done = asyncio.run(one())
    except grpc.aio.AioRpcError as e:  # reported with its code
        pytest.fail(f"{e.code().name}: {e.details()}")
    assert len(done.token_ids) == 3
