"""`pdserve bench --client-processes K`: one rate's requests sent from K client processes.

One Python process streams on the order of 10,000 gRPC responses a second before its CPU,
not the server, sets the pace: past that its timestamps run late and it reports the
server slower than it is. With K processes the arrival schedule is drawn once, as for one
process; request ``i`` goes to process ``i % K``, which sends it at its offset from a start
time that every process reads off the same clock (``time.perf_counter``: the system's
monotonic clock on Linux), and records its responses against that start. The parent merges
the records by request index, so the report is computed as for one process.

The processes start once per sweep (their imports and channels are not on any rate's
clock) and serve each rate in turn. ``--max-concurrency`` is split evenly between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from pdserve.cluster.bench.config import BenchConfig
from pdserve.cluster.bench.data import Prompt
from pdserve.cluster.bench.records import RequestRecord

# Between handing a rate's shards out and their common start: every process has its shard
# and waits for the start by then.
START_LEAD_S = 0.25


@dataclass(frozen=True)
class Shard:
    """What one process sends at one rate: ``(index, offset_s, prompt)`` triples."""

    requests: tuple[tuple[int, float, Prompt], ...]
    start: float  # time.perf_counter() value all offsets count from
    max_concurrency: int | None


# How a client process sends its shard: ``send(cfg, shard, done)`` (``serve.send_shard``,
# handed in so that this module does not import the one that uses it).
SendShard = Callable[[BenchConfig, Shard, Any], Coroutine[Any, Any, list[RequestRecord]]]


def _serve(conn: Connection, cfg: BenchConfig, done: Any, send: SendShard) -> None:
    """A client process: run each shard it is sent, reply with its records; stop on None."""
    conn.send("ready")
    while (shard := conn.recv()) is not None:
        conn.send(asyncio.run(send(cfg, shard, done)))


class ClientProcesses:
    """K client processes for one sweep (``with``: they stop at the end), each sending its
    shards with ``send`` (a module-level function: the spawned processes import it)."""

    def __init__(self, cfg: BenchConfig, count: int, send: SendShard) -> None:
        ctx = mp.get_context("spawn")  # no inherited event loop, gRPC state or threads
        self.done = ctx.Value("i", 0)  # requests finished in the current rate, all processes
        self._conns: list[Connection] = []
        self._procs = []
        for k in range(count):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(child, cfg, self.done, send),
                            name=f"bench-client-{k}", daemon=True)
            p.start()
            self._conns.append(parent)
            self._procs.append(p)
        for conn in self._conns:
            if conn.recv() != "ready":
                raise RuntimeError("a bench client process failed to start")

    def __enter__(self) -> ClientProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):  # a process that died has closed its end
                conn.send(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()

    async def run(self, requests: Sequence[tuple[int, float, Prompt]],
                  max_concurrency: int | None,
                  on_progress: Callable[[int], object] | None = None) -> list[RequestRecord]:
        """Send the ``(index, offset_s, prompt)`` requests, the j-th from process ``j % K``;
        the records, by index. ``on_progress(n)`` gets the number of requests finished so
        far, a few times a second."""
        k = len(self._conns)
        cap = None if max_concurrency is None else math.ceil(max_concurrency / k)
        with self.done.get_lock():
            self.done.value = 0
        start = time.perf_counter() + START_LEAD_S
        for j, conn in enumerate(self._conns):
            conn.send(Shard(tuple(requests[j::k]), start, cap))
        loop = asyncio.get_running_loop()
        pending = [loop.run_in_executor(None, conn.recv) for conn in self._conns]
        while not all(f.done() for f in pending):
            await asyncio.wait(pending, timeout=0.25)
            if on_progress is not None:
                on_progress(self.done.value)
        records = [r for f in pending for r in f.result()]
        return sorted(records, key=lambda r: r.index)
