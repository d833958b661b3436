"""Bounded worker teardown: threads joined against one deadline, KV channels aborted.

Why abort rather than a clean shutdown: ``ProcessGroupNCCL.shutdown()`` (torch >= 2.6)
finalizes the communicator, which flushes outstanding work and then waits until the peer
tears its end down too. A worker that closes its channels cleanly therefore waits on every
peer worker, one channel after the other; two workers that close their shared channels in
different orders (a channel dict fills in whatever order the router's concurrent opens
finish) can wait on each other until killed. An abort does not flush and is meant to be
local; it also fails the work a transfer thread is waiting on, which wakes that thread.
Each channel is aborted on a thread of its own, so that an abort that does block (some NCCL
versions synchronize with the peer even there) holds up neither the others nor the caller
past the deadline. Peers still tear down together when the launcher stops every worker at
once (``cluster.launch.Deployment.stop``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from pdserve.engine.kv import KVReceiver, KVSender

SHUTDOWN_GRACE_S = 5.0  # a worker's shutdown() returns within about this


def join_threads(threads: Iterable[threading.Thread], deadline: float) -> list[str]:
    """Join every started thread until ``deadline`` (``time.monotonic()``); returns the names
    of those still running then."""
    alive = []
    for t in threads:
        if t.ident is None:  # never started (e.g. shutdown after a failed warm-up)
            continue
        t.join(max(deadline - time.monotonic(), 0.0))
        if t.is_alive():
            alive.append(t.name)
    return alive


def abort_channels(channels: Iterable[KVSender | KVReceiver], deadline: float) -> list[str]:
    """Abort every channel (``close(abort=True)``), all at once, and wait for them until
    ``deadline``; returns the names of the aborts still running then."""
    threads = [
        threading.Thread(target=ch.close, kwargs={"abort": True}, name=f"kv-abort-{ch.name}",
                         daemon=True)
        for ch in channels
    ]
    for t in threads:
        t.start()
    return join_threads(threads, deadline)
