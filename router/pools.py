"""Workers that join and leave a running deployment.

A worker joins (``add_worker``) once it has started: its KV channels to every serving peer
open, handshake included, and only then does placement see it. A worker leaves by draining
(``drain``): from the first moment no placement sees it (no new leases or prompts); the
attempts already on it run to their end (a decode worker's sequences finish, a prefill
worker's prompts are prefilled and their KV sent); what is still there after ``timeout_s``
migrates: each such request is re-prefilled elsewhere with its prompt and the tokens it
streamed (as after a preemption), so its stream goes on with the next token. Then both ends
of its channels close and its handle leaves the router; the caller stops its actor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from pdserve.router.load import LoadSnapshot
from pdserve.router.request import Request, State
from pdserve.router.router import Router

DRAIN_POLL_S = 0.05
log = logging.getLogger("pdserve.router")


@dataclass(frozen=True)
class Drained:
    """How a drain went: ``finished`` attempts ended on the worker, ``migrated`` moved."""

    name: str
    role: str
    seconds: float
    finished: int
    migrated: int


async def add_worker(router: Router, role: str, name: str, handle: Any) -> None:
    """``name`` (a started ``role`` worker) joins; waiting requests may go to it at once."""
    await router.dispatcher.add(role, name, handle)
    watch(router, name, handle)
    pools_changed(router)


def watch(router: Router, name: str, handle: Any) -> None:
    """Learn of ``name``'s death as Ray does: its ``watch`` call lasts until the worker
    shuts down, and fails once its process is gone (``worker_lost`` follows)."""
    async def watching() -> None:
        try:
            await handle.watch.remote()
        except Exception as e:  # RayActorError: the process died, or was killed
            await worker_lost(router, name, f"{type(e).__name__}")

    router.dispatcher.watches[name] = asyncio.ensure_future(watching())


async def worker_lost(router: Router, name: str, why: str) -> list[Request]:
    """``name`` died: no placement sees it, every request whose attempt ran there is
    re-dispatched (prompt and streamed tokens, re-prefilled elsewhere; a failed attempt,
    so one that keeps failing ends UNAVAILABLE), and it leaves the router. Returns those
    requests."""
    d = router.dispatcher
    if d.lose(name) is None:
        return []  # drained and removed before it died
    log.warning("worker %s is gone (%s): re-dispatching what ran there", name, why)
    hit = on_worker(router, name)
    for req in hit:
        router.metrics.observe_retry()
        router.retry(req, f"worker {name} is gone")
    await d.remove(name)
    router.metrics.forget_worker(name)
    pools_changed(router)
    return hit


def pools_changed(router: Router) -> None:
    """A worker joined, began to drain or left: the pool gauges, and a pump (a joiner has
    room for what waits)."""
    d = router.dispatcher
    draining = d.draining_counts()
    for role, loads in (("prefill", d.p_load), ("decode", d.d_load)):
        router.metrics.set_workers(role, "serving", len(loads))
        router.metrics.set_workers(role, "draining", draining[role])
    router.pump()


def on_worker(router: Router, name: str) -> list[Request]:
    """The requests whose current attempt runs on ``name``: leased there, or prefilling or
    sending their KV there."""
    return [r for r in router.requests.values() if not r.done and (
        (r.lease is not None and r.lease.worker == name)
        or (r.prefill_worker == name and r.state in (State.PREFILLING, State.TRANSFERRING)))]


async def drain(router: Router, name: str, timeout_s: float) -> Drained:
    """Drain ``name`` and take it out of the router (see the module's docstring)."""
    d = router.dispatcher
    role = d.start_draining(name)  # ValueError: unknown, or the last of its pool
    pools_changed(router)
    t0 = time.monotonic()
    before = {r.request_id for r in on_worker(router, name)}

    def busy() -> bool:
        return bool(on_worker(router, name)) or d.reserving[name] > 0

    end = t0 + timeout_s
    while busy() and time.monotonic() < end:
        await asyncio.sleep(DRAIN_POLL_S)
    migrated = on_worker(router, name)
    for req in migrated:  # re-prefilled elsewhere with what it streamed; not a failure
        router.retry(req, f"{name} drained", failed=False)
    while d.reserving[name] > 0:  # a lease asked for before the drain began
        await asyncio.sleep(DRAIN_POLL_S)
    await d.remove(name)
    router.metrics.forget_worker(name)
    pools_changed(router)
    return Drained(name, role, time.monotonic() - t0,
                   len(before) - len({r.request_id for r in migrated} & before), len(migrated))


def load_snapshot(router: Router) -> LoadSnapshot:
    """What the autoscaler reads: the load window, what waits, and the pools."""
    d = router.dispatcher
    now = router.clock()
    queued = sum(w.queued_tokens for w in [*d.p_load.values(), *d.d_load.values()])
    return dataclasses.replace(
        router.load.reading(now), waiting=router.scheduler.num_waiting(),
        queued_prompt_tokens=queued,
        decode_batch=sum(w.batch for w in d.d_load.values()),
        kv_usage=max((w.kv_usage for w in d.d_load.values()), default=0.0),
        serving={"prefill": len(d.p_load), "decode": len(d.d_load)},
        draining=d.draining_counts(),
        workers=tuple(sorted({*d.prefill, *d.decode})),
    )
