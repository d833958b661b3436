"""Stand-ins around real workers run in-process: a router that records the workers' reports,
a small worker config, a polling wait."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pdserve.engine.config import CacheConfig, ModelSpec, RunnerConfig, WorkerConfig


class FakeRouter:
    """Takes the workers' reports (``router.on_step.remote(report)`` and the like)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        calls = self.calls

        class Method:
            def remote(self, *args: Any) -> None:
                calls.append((name, args))

        return Method()


def worker_config(decode_blocks: int = 64) -> WorkerConfig:
    return WorkerConfig(ModelSpec("dummy", preset="tiny"), CacheConfig(4, decode_blocks),
                        RunnerConfig(), max_batch_tokens=64, max_num_seqs=4,
                        transfer_timeout_s=20.0)


def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)

