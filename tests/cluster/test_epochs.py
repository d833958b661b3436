"""Every decode worker incarnation runs under an epoch of its own (``cluster.pools``): the
epochs handed out only grow (past the wall clock's milliseconds, so across restarts of the
serving process too), and ``create_worker`` gives each decode worker a fresh one unless told
which. A replacement therefore never shares its predecessor's epoch, and a transfer stamped
with an older one is refused (``decode_worker.worker._refusal``)."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from pdserve.cluster import pools
from pdserve.cluster.config import ServeConfig


def test_epochs_only_grow_and_start_past_the_clock() -> None:
    now_ms = time.time_ns() // 1_000_000
    epochs = [pools.next_epoch() for _ in range(1000)]
    assert epochs[0] >= now_ms
    assert all(b > a for a, b in itertools.pairwise(epochs))


def test_each_decode_worker_created_gets_a_new_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[type, tuple[Any, ...]]] = []

    class Remote:
        def __init__(self, cls: type) -> None:
            self.cls = cls

        def options(self, **_: Any) -> Remote:
            return self

        def remote(self, *args: Any) -> None:
            made.append((self.cls, args))

    monkeypatch.setattr(pools.ray, "remote", Remote)
    cfg = ServeConfig()
    pools.create_worker(cfg, "decode", "decode-0", None)
    pools.create_worker(cfg, "decode", "decode-1", None)  # e.g. decode-0's replacement
    pools.create_worker(cfg, "decode", "decode-2", None, epoch=7)
    pools.create_worker(cfg, "prefill", "prefill-0", None)
    (_, a), (_, b), (_, c), (prefill_cls, p) = made
    assert a[0] == "decode-0" and b[0] == "decode-1"
    assert b[3] > a[3] and c[3] == 7
    assert prefill_cls is pools.PrefillActor and len(p) == 3  # prefill workers have none
