"""Dispatch: where each attempt of a request runs, and the router's view of the worker pools.

An attempt leases blocks on a decode worker, then hands the prompt (after a preemption,
prompt + generated tokens) to a prefill worker, over the pair's KV channel (opened the first
time the pair is used), or to the decode worker itself: always in colocated mode, and under
conditional disaggregation when the placement says so. Under the ``slo`` scheduler the
router's placer (``router.placement``) names the decode worker and where to prefill
(``dispatch_to``); under ``fifo`` the first decode worker in ``policy.decode_order`` that
grants a lease wins, and ``policy.pick_prefill`` and ``policy.prefill_locally`` decide the
rest (``dispatch``).

The dispatcher keeps what those choices read: per decode worker what it last reported plus
the leases granted since, per worker the prompt tokens handed to it to prefill and not
prefilled yet (a prompt's cached prefix aside), and the prefix index
(``router.prefix_index``): which worker is expected to hold which prompt prefix in its
prefix cache. A lease asks the decode worker to share the prefix it holds (the reservation
carries the tokens); every placed prompt is recorded for the workers that prefill and
decode it, and a finished request's output too for its decode worker. It runs on the router
actor's event loop, like the ``Router`` that owns it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

from pdserve.engine.messages import Lease, PrefillTask, Reservation, StepReport
from pdserve.router.channels import Channels
from pdserve.router.metrics import Metrics
from pdserve.router.placement import Placement
from pdserve.router.policy import (
    DecodeLoad,
    LocalPrefillRule,
    PrefillLoad,
    decode_order,
    pick_prefill,
    prefill_locally,
)
from pdserve.router.prefix_index import PrefixIndex
from pdserve.router.request import Request, State

log = logging.getLogger("pdserve.router")


class Dispatcher:
    """Leases, prompt placement and KV channels (``channels``: ``router.channels``) for the
    router's requests."""

    def __init__(
        self,
        prefill: dict[str, Any],
        decode: dict[str, Any],
        local_prefill: LocalPrefillRule,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        prefix: PrefixIndex | None = None,
    ) -> None:
        self.prefill = prefill
        self.decode = decode
        self.local_prefill = local_prefill
        self.metrics = metrics
        self.clock = clock  # the router's
        self.p_load = {n: PrefillLoad(n) for n in prefill}
        self.d_load = {n: DecodeLoad(n) for n in decode}
        # Prompt tokens handed to a worker (a prefill worker, or a decode worker that
        # prefills them itself) and not prefilled yet, per attempt (by lease transfer id):
        # (request id, worker load, tokens). The loads' queued_tokens and queued_attention
        # are their sums per worker, kept by _enqueue and dequeue alone.
        # (request id, worker load, tokens, attention).
        self._queued: dict[int, tuple[str, PrefillLoad | DecodeLoad, int, int]] = {}
        self.prefix = prefix if prefix is not None else PrefixIndex(16, enabled=False)
        self.channels = Channels(prefill, decode)  # the KV channels, and their repair
        self.endpoints = self.channels.endpoints  # (prefill, decode) -> the store's host:port
        # Workers being drained: out of p_load / d_load (no placement sees them), their
        # handles still in ``prefill`` / ``decode`` for the attempts that finish there.
        self.draining: dict[str, PrefillLoad | DecodeLoad] = {}
        self.reserving: collections.Counter[str] = collections.Counter()  # leases asked for
        self.watches: dict[str, asyncio.Future[None]] = {}  # liveness (router.pools.watch)

    async def dispatch(self, req: Request, first: Collection[str] = ()) -> bool:
        """``fifo``: lease blocks on the first decode worker (``policy.decode_order``, the
        workers named in ``first`` before the others: a sibling's, router.fanout) that
        grants them, then hand the prompt to a prefill worker (``policy.pick_prefill``) or
        to that decode worker. False when no decode worker has room (the request stays
        queued)."""
        await self._release_old(req)
        tokens = req.prompt_ids + req.output_ids  # after a preemption: recompute both
        cached = self.cached(req)
        order = decode_order(self.d_load.values(), cached)
        for load in sorted(order, key=lambda w: w.name not in first):
            if not self.reachable(load.name):
                continue
            lease = await self._reserve(load.name, req)
            if lease is None:
                continue
            if lease.worker in self.d_load and self.reachable(lease.worker):
                break
            self.decode[lease.worker].abort.remote(req.request_id, lease.transfer_id)
        else:
            return False
        return await self._start(req, lease, self.prefill_worker_for(len(tokens), lease.worker,
                                                                    cached), None)

    async def dispatch_to(self, req: Request, where: Placement) -> bool:
        """``slo``: lease blocks on the decode worker the placer chose and prefill where it
        said. False when that worker refuses the lease (the router's view of it was
        stale); the request stays queued."""
        await self._release_old(req)
        lease = await self._reserve(where.decode, req)
        if lease is None:
            return False
        p = self.p_load.get(where.prefill) if where.prefill is not None else None
        if where.decode not in self.d_load or (where.prefill is not None and (
                p is None or not self.channels.usable(where.prefill, where.decode))):
            # Drained, or its channel broke, while the lease was on its way: it stays queued,
            # and its next dispatch waits for this lease to go first (see _release_old).
            req.releasing = self.decode[where.decode].abort.remote(req.request_id,
                                                                   lease.transfer_id)
            return False
        return await self._start(req, lease, p, where)

    async def _reserve(self, worker: str, req: Request) -> Lease | None:
        """Ask ``worker`` for a lease (a drain waits for the asks in flight to it)."""
        self.reserving[worker] += 1
        try:
            tokens = req.prompt_ids + req.output_ids
            needed = self.prefix.enabled or req.sampling.uses_penalties
            return await self.decode[worker].reserve.remote(Reservation(
                req.request_id, len(tokens), len(req.output_ids), req.sampling, req.order,
                token_ids=tuple(tokens) if needed else ()))
        finally:
            self.reserving[worker] -= 1
            if not self.reserving[worker]:
                del self.reserving[worker]

    async def _release_old(self, req: Request) -> None:
        if req.releasing is not None:
            # The failed attempt's lease goes first: a threaded decode actor runs calls
            # concurrently, and a reserve that overtook the abort would find the request
            # still holding a lease there and refuse it.
            releasing, req.releasing = req.releasing, None
            with contextlib.suppress(Exception):  # a dead worker: nothing left to free
                await releasing

    async def _start(self, req: Request, lease: Lease, p: PrefillLoad | None,
                     where: Placement | None) -> bool:
        """Run the attempt under ``lease``: prefill on ``p``, or on the decode worker that
        granted the lease when ``p`` is None. True: the request left the queue."""
        tokens = req.prompt_ids + req.output_ids
        d = self.d_load[lease.worker]
        d.grant(lease.num_blocks, len(tokens))
        if req.done:  # aborted while we waited for the lease
            self.decode[lease.worker].abort.remote(req.request_id, lease.transfer_id)
            return True
        if p is not None:
            await self.channels.ensure(p.name, lease.worker)
        if req.done:
            self.decode[lease.worker].abort.remote(req.request_id, lease.transfer_id)
            return True
        req.lease = lease
        req.prefill_worker = p.name if p is not None else ""
        req.attempts += 1
        req.state = State.PREFILLING
        req.awaiting_first = True
        if where is not None:  # an uncalibrated cost model's placement predicts nothing (0)
            req.predicted_tpot_s = where.tpot_s if where.tpot_s > 0 else None
        if req.attempts == 1:
            req.queue_s = self.clock() - req.queued_at
        task = PrefillTask(req.request_id, tuple(tokens), len(req.output_ids), req.sampling,
                           lease)
        where_prefill = p.name if p is not None else lease.worker
        hashes = self.prefix.request_hashes(req)
        hit = self.prefix.cached_tokens(where_prefill, hashes, len(tokens))
        self._enqueue(req.request_id, p if p is not None else d, lease.transfer_id,
                      len(tokens), hit)
        self.prefix.record(where_prefill, hashes)
        self.prefix.record(lease.worker, hashes)
        if p is None:  # the decode worker prefills the prompt itself
            if self.prefill:  # by conditional disaggregation's choice, not colocated mode
                self.metrics.observe_local_prefill()
            self.decode[lease.worker].submit.remote(task)
        else:
            self.prefill[p.name].submit.remote(task)
        return True

    def record_step(self, report: StepReport) -> None:
        """What a decode worker reported of itself with its step (the channels whose
        receiver ended among it)."""
        for name in report.broken_channels:
            self.channels.broken(name, f"its receiver on {report.worker} ended")
        self.channels.revive(report.worker)
        load = self.d_load.get(report.worker)
        if load is not None:
            load.report(report.num_running, report.num_waiting, report.num_free_blocks,
                        report.kv_usage, report.context_tokens, self.clock())
            self.metrics.set_kv_usage(report.worker, report.kv_usage)

    # -- prompt tokens queued on the workers that prefill them -------------------------------
    def _enqueue(self, request_id: str, load: PrefillLoad | DecodeLoad, transfer_id: int,
                 n: int, cached: int = 0) -> None:
        """``n`` prompt tokens to ``load``'s worker, the first ``cached`` of them expected in
        its prefix cache (not computed: m = n - cached tokens of attention m·n)."""
        m, att = n - cached, (n - cached) * n
        load.enqueue(m, self.clock(), att)
        self._queued[transfer_id] = (request_id, load, m, att)

    def dequeue(self, transfer_id: int) -> None:
        """That attempt's prompt left its worker's prefill queue (first token, abort, or a
        failed step); once per attempt, whichever report comes first."""
        entry = self._queued.pop(transfer_id, None)
        if entry is not None:
            _, load, n, att = entry
            load.dequeue(n, att)

    def prefill_step_ended(self, worker: str, tokens: int) -> None:
        """Prefill worker ``worker`` ended a step of ``tokens`` prompt tokens (the first
        first token of the step reports it, before any of the step's prompts dequeue)."""
        self.channels.revive(worker)
        load = self.p_load.get(worker)
        if load is not None:
            load.step_ended(tokens, self.clock())

    def dequeue_request(self, request_id: str, worker: str) -> None:
        """Every attempt of ``request_id`` still queued on ``worker``."""
        for tid, (rid, load, _, _) in list(self._queued.items()):
            if rid == request_id and load.name == worker:
                self.dequeue(tid)

    def prefill_worker_for(self, num_tokens: int, decode: str | None = None,
                           cached: dict[str, int] | None = None) -> PrefillLoad | None:
        """The prefill worker for ``num_tokens`` tokens to prefill (for ``decode``: one whose
        channel to it is usable), or None when the decode worker that leased them prefills
        them itself: always in colocated mode (there are no prefill workers), and in
        disaggregated mode when ``local_prefill`` says so."""
        if not self.prefill:
            return None
        p = pick_prefill((w for w in self.p_load.values()
                          if decode is None or self.channels.usable(w.name, decode)), cached)
        return None if prefill_locally(num_tokens, p, self.local_prefill) else p

    def cached(self, req: Request) -> dict[str, int]:
        """Per serving worker, the leading tokens of ``req``'s prompt + output it is
        expected to hold in its prefix cache (``router.prefix_index``)."""
        return self.prefix.expected(req, [*self.p_load, *self.d_load])

    def reachable(self, decode: str) -> bool:
        """Some prefill worker's channel to ``decode`` is usable (or there is no prefill
        pool): ``fifo`` and the uncalibrated placement skip a decode worker without one."""
        return not self.p_load or any(self.channels.usable(p, decode) for p in self.p_load)

    # -- KV channels -------------------------------------------------------------------------
    async def open_channels(self) -> None:
        """Open every (prefill, decode) channel now, so that no request pays for it, and
        read each worker's pool size (for admission's KV check and the prefix index) and
        each decode worker's free blocks for the view."""
        await asyncio.gather(*(self.channels.ensure(p, d) for p in self.prefill
                               for d in self.decode))
        for pool, loads in ((self.prefill, self.p_load), (self.decode, self.d_load)):
            for name, stats in zip(pool, await asyncio.gather(
                    *(h.stats.remote() for h in pool.values())), strict=True):
                load = loads.get(name)
                if stats is None or load is None:
                    continue
                load.num_blocks = stats.num_blocks
                self.prefix.set_capacity(name, stats.num_blocks)
                if isinstance(load, DecodeLoad) and not load.known:
                    load.report(stats.num_running, stats.num_waiting, stats.num_free_blocks,
                                stats.kv_usage, 0)

    # -- workers that come and go ------------------------------------------------------------
    async def add(self, role: str, name: str, handle: Any) -> None:
        """A started worker joins its pool: its KV channels to every serving peer open
        (handshake included) before any placement sees it."""
        if name in self.prefill or name in self.decode:
            raise ValueError(f"a worker named {name!r} is already in the deployment")
        if role == "prefill":
            self.prefill[name] = handle
            pairs = [(name, d) for d in self.d_load]
        elif role == "decode":
            self.decode[name] = handle
            pairs = [(p, name) for p in self.p_load]
        else:
            raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
        try:
            await asyncio.gather(*(self.channels.ensure(p, d) for p, d in pairs))
        except BaseException:
            await self.remove(name)
            raise
        stats = await handle.stats.remote()
        if stats is not None:
            self.prefix.set_capacity(name, stats.num_blocks)
        size = stats.num_blocks if stats is not None else 0
        if role == "prefill":
            self.p_load[name] = PrefillLoad(name, num_blocks=size)
            return
        load = DecodeLoad(name, num_blocks=size)
        if stats is not None:
            load.report(stats.num_running, stats.num_waiting, stats.num_free_blocks,
                        stats.kv_usage, 0, self.clock())
        self.d_load[name] = load

    def start_draining(self, name: str) -> str:
        """No placement sees ``name`` from now on; returns its role. The last serving
        worker of a pool cannot go (nothing would serve what it serves)."""
        if name in self.draining:
            raise ValueError(f"{name} is draining already")
        for pool, loads in (("prefill", self.p_load), ("decode", self.d_load)):
            if name in loads and len(loads) == 1:
                raise ValueError(f"{name} is the last serving {pool} worker")
        role = self.lose(name)
        if role is None:
            raise ValueError(f"no worker named {name!r}")
        return role

    def lose(self, name: str) -> str | None:
        """``name`` died: no placement sees it from now on, the last of its pool too (its
        pool then waits for a replacement); its role, or None if it had left already."""
        for role, loads in (("prefill", self.p_load), ("decode", self.d_load)):
            if name in loads:
                self.draining[name] = loads.pop(name)
                self.prefix.forget(name)
                return role
        if name in self.draining:
            return "prefill" if name in self.prefill else "decode"
        return None

    def draining_counts(self) -> dict[str, int]:
        """Workers draining, per role."""
        return {"prefill": sum(1 for n in self.draining if n in self.prefill),
                "decode": sum(1 for n in self.draining if n in self.decode)}

    async def remove(self, name: str) -> None:
        """``name`` leaves the deployment: both ends of its KV channels close (at once:
        each end's close is local, its goodbye tells the other), its handle goes."""
        await self.channels.close_all(name)
        self.draining.pop(name, None)
        self.watches.pop(name, None)
        self.prefix.forget(name)
        self.p_load.pop(name, None)
        self.d_load.pop(name, None)
        self.prefill.pop(name, None)
        self.decode.pop(name, None)
