"""The router's scheduler: admission (the predicted-TTFT check and the queue cap), the wait
queue, and the pump that hands waiting requests to the dispatcher in the order and to the
placement the configured policy gives.

- ``slo``: priority, then TTFT deadline (``router.waiting``); each request to the placement
  the cost model rates best (``router.placement``); a request that fits nowhere now does
  not hold back the ones behind it. A request whose best placement would push requests
  already on that decode worker past their TPOT objective waits for a better one only
  while it can afford to: while its predicted TTFT from arrival, placed now, is under
  ``DEFER_SHARE`` of its own objective. Past that it is placed all the same. A hard bar
  (never break a running request's TPOT) caps the batch at the tightest objective present,
  and with a tight class always present the deployment then serves fewer requests a
  second than arrive: every TTFT grows without bound and goodput falls below FIFO's
  (docs/benchmarks.md, 2026-12-07).
- ``fifo``: arrival order, the fifo placement rules (``router.policy``), stopping at the
  first request no decode worker grants a lease: today's baseline.

It runs on the router actor's event loop, beside the ``Router`` that owns it.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from pdserve.router.admission import TtftResidual, judge, predict_ttft
from pdserve.router.capacity import check_fits
from pdserve.router.config import RouterConfig
from pdserve.router.cost_model import CostModel
from pdserve.router.dispatch import Dispatcher
from pdserve.router.fanout import prefer
from pdserve.router.placement import Ask, Placement, Placer
from pdserve.router.rates import Rate
from pdserve.router.request import Request
from pdserve.router.waiting import WaitQueue, deadline

log = logging.getLogger("pdserve.router")

# A request holds back for the TPOT objectives of others while its predicted TTFT, if
# placed now, uses less than this share of its own TTFT objective (the rest is the margin
# for the predictions' error).
DEFER_SHARE = 0.5
# A request that misses its TTFT objective whatever happens is lost to goodput already: it
# waits for a placement that harms no one until it has waited this many TTFT objectives
# (bounded, so that a deployment that always holds tight objectives does not starve it).
LATE_WAIT = 2.0


class Refused(Exception):
    """Admission refused (RESOURCE_EXHAUSTED): the request's predicted TTFT misses its
    objective, or the wait queue is at its cap."""


class Scheduler:
    """Admits requests into the wait queue and pumps them out to the dispatcher."""

    def __init__(
        self,
        cfg: RouterConfig,
        dispatcher: Dispatcher,
        model: CostModel,
        requests: Mapping[str, Request],
        fail: Callable[[Request, str, str], None],
        queue_changed: Callable[[], None],
        spawn: Callable[[Awaitable[None]], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.dispatcher = dispatcher
        self.model = model
        self.requests = requests  # the router's in-flight requests (read only here)
        self._fail = fail  # ends a request whose dispatch raised
        self._queue_changed = queue_changed  # after each pump: the queue gauges
        self._spawn = spawn  # runs a coroutine on the router's loop
        self.clock = clock  # the router's (``pdserve tune``: its simulated loop's)
        self.placer = Placer(model, cfg.max_num_seqs, cfg.block_size, cfg.decode_prefills,
                             clock, cfg.local_prefill)
        self.finishes = Rate()  # requests finished per second
        self.residual = TtftResidual()
        self.waiting = WaitQueue(cfg.scheduler)
        self._order = itertools.count(1)  # admission numbers (Request.order)
        self._pumping = False
        self._repump = False
        self._wake: asyncio.TimerHandle | None = None  # the pump a held-back request awaits
        self._wake_at = math.inf

    # -- admission --------------------------------------------------------------------------
    def admit(self, req: Request) -> None:
        """Number ``req``, predict its TTFT (``slo``, once calibrated) and queue it; raises
        ``TooLarge`` when no worker's KV pool could hold it (``router.capacity``), Refused
        when the queue is full or the prediction misses the objective."""
        d = self.dispatcher
        check_fits(len(req.prompt_ids), req.sampling.max_tokens, d.p_load.values(),
                   d.d_load.values(), self.placer.block_size)
        self.waiting.prune()  # requests ended while waiting hold no place in the queue
        if len(self.waiting) >= self.cfg.max_waiting:
            raise Refused(f"queue full: {len(self.waiting)} requests already waiting")
        now = self.clock()
        req.order = next(self._order)
        if self.cfg.scheduler == "slo" and self.model.calibrated:
            predicted = predict_ttft(self.placer, req, self.waiting.ahead_of(req, now),
                                     d.p_load.values(), d.d_load.values(),
                                     self.finishes.rate(now), now, self._held_tpot(),
                                     d.cached(req))
            predicted = max(now - req.arrival,
                            predicted + self.residual.get(req.slo.class_name, now))
            verdict = judge(req, predicted)
            if verdict.refusal:
                self.residual.refused(req.slo.class_name, now)
                raise Refused(verdict.refusal)
            req.predicted_ttft_s = predicted
        req.queued_at = now
        self.waiting.push(req)

    def observe_ttft(self, req: Request, ttft_s: float) -> None:
        """``req``'s first token came ``ttft_s`` after its arrival: its class's residual
        learns the error of its admission's prediction."""
        if req.predicted_ttft_s is not None:
            self.residual.observe(req.slo.class_name, req.predicted_ttft_s, ttft_s,
                                  self.clock())

    def requeue(self, req: Request) -> None:
        """A retried or preempted request, back in the queue (ahead of new ones in fifo)."""
        self.waiting.push_retry(req)

    def num_waiting(self) -> int:
        return sum(1 for r in self.waiting if not r.done)

    # -- the pump ---------------------------------------------------------------------------
    async def pump(self) -> None:
        """Dispatch waiting requests while the workers have room (one pump at a time; a
        call during a pump makes it run another round)."""
        if self._pumping:
            self._repump = True
            return
        self._pumping = True
        try:
            while True:
                self._repump = False
                if self.cfg.scheduler == "fifo":
                    await self._pump_fifo()
                else:
                    await self._pump_slo()
                if not self._repump:
                    break
        finally:
            self._pumping = False
            self.waiting.prune()
            self._queue_changed()

    async def _pump_fifo(self) -> None:
        """In arrival order, stopping at the first request no decode worker has room for."""
        while True:
            self.waiting.prune()
            order = self.waiting.ordered(self.clock())
            if not order:
                return
            if not await self._try(order[0], None):
                return

    async def _pump_slo(self) -> None:
        """In the wait queue's order (priority, then TTFT deadline), each request to the
        placement the cost model rates best; one that fits nowhere now does not hold back
        the ones behind it."""
        held = self._held_tpot()
        refused: set[str] = set()  # decode workers that refused a lease this round
        for req in self.waiting.ordered(self.clock()):
            if req.done:
                continue
            if all(d.batch >= self.cfg.max_num_seqs or d.name in refused
                   for d in self.dispatcher.d_load.values()):
                return  # no seat anywhere: the next step report or finish pumps again
            where = self._place(req, held, refused)
            if where is None:
                continue
            if await self._try(req, where):
                if req.tpot_slo_s and req.lease is not None:
                    bisect.insort(held.setdefault(req.lease.worker, []), req.tpot_slo_s)
            else:
                refused.add(where.decode)

    async def _try(self, req: Request, where: Placement | None) -> bool:
        """Dispatch ``req`` (to ``where``, or by the fifo rules); False when it stays
        queued for want of a lease."""
        try:
            ok = await (self.dispatcher.dispatch(req, self._sibling_workers(req))
                        if where is None else self.dispatcher.dispatch_to(req, where))
        except Exception as e:  # a worker or channel failed: a failed attempt
            log.warning("dispatch of %s failed: %s: %s", req.request_id, type(e).__name__, e)
            req.failures += 1
            if req.done or req.failures < self.cfg.max_attempts:
                return False  # it stays queued (a dead worker leaves the pools soon)
            self._fail(req, "UNAVAILABLE", f"dispatch failed: {e}")
            ok = True
        if ok:
            self.waiting.remove(req)
        return ok

    def _place(self, req: Request, held: Mapping[str, Sequence[float]],
               refused: set[str]) -> Placement | None:
        """Where ``req`` goes now, or None if no decode worker has room for it or it
        waits for a placement that breaks no other request's TPOT objective."""
        d = self.dispatcher
        n = len(req.prompt_ids) + len(req.output_ids)
        decode = [w for w in d.d_load.values() if w.name not in refused]
        cached = d.cached(req)  # the prefix index: tokens each worker is expected to hold
        siblings = self._sibling_workers(req)
        if not self.model.calibrated:  # no predictions yet: least loaded, by the view
            room = [w for w in decode if self.placer.has_room(w, n) and d.reachable(w.name)]
            if not room:
                return None
            w = min(room, key=lambda w: (w.name not in siblings, w.batch,
                                         -cached.get(w.name, 0), w.kv_usage))
            p = d.prefill_worker_for(n, w.name, cached)
            return Placement(w.name, p.name if p else None, 0.0, 0.0, 0.0, True, 0.0)
        options = self.placer.options(Ask(n, req.slo, cached), d.p_load.values(), decode,
                                      held, usable=d.channels.usable)
        if not options:
            return None
        best = prefer(options, siblings) or options[0]
        if best.harm and req.ttft_slo_s:
            # It may wait for a placement that harms no one until DEFER_SHARE of its TTFT
            # objective would be gone (never without one: nothing would bound its wait);
            # one that misses its TTFT anyway, until it waited LATE_WAIT objectives.
            now, obj = self.clock(), req.ttft_slo_s
            give_up = req.arrival + DEFER_SHARE * obj - best.ttft_s
            if now + best.ttft_s > deadline(req):
                give_up = req.arrival + LATE_WAIT * obj
            if now < give_up:
                self._wake_by(give_up)
                return None
        return best

    def _wake_by(self, at: float) -> None:
        """Pump again by ``at`` on the router's clock (a held-back request gives up waiting
        then, whether or not a step report or a finish pumps before)."""
        if at >= self._wake_at:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake_at = at
        self._wake = asyncio.get_running_loop().call_later(
            max(0.0, at - self.clock()), self._woken)

    def _woken(self) -> None:
        self._wake, self._wake_at = None, math.inf
        self._spawn(self.pump())

    def _sibling_workers(self, req: Request) -> set[str]:
        """n > 1: the decode workers that hold ``req``'s siblings (``router.fanout``)."""
        if not req.parent:
            return set()
        return {r.lease.worker for r in self.requests.values()
                if r.parent == req.parent and r.lease is not None and r is not req}

    def _held_tpot(self) -> dict[str, list[float]]:
        """Per decode worker, the TPOT objectives of the requests it holds, sorted."""
        out: dict[str, list[float]] = {}
        for r in self.requests.values():
            if r.lease is not None and r.tpot_slo_s and not r.done:
                out.setdefault(r.lease.worker, []).append(r.tpot_slo_s)
        for objectives in out.values():
            objectives.sort()
        return out
