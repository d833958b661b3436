"""The request state machine: admit, dispatch each attempt (``router.dispatch``: lease a
decode worker, hand the prompt to a prefill worker or to the decode worker itself), stream
what the workers report, re-dispatch after a preemption or a failure, and clean up on
finish, abort or deadline.

    QUEUED -> PREFILLING -> TRANSFERRING -> DECODING -> FINISHED
                                     (ABORTED by the client, FAILED on errors)

Everything here runs on the router actor's event loop; worker calls are Ray actor calls
(``handle.method.remote(...)``). Worker reports arrive as method calls on the router actor
and are applied synchronously, so they never interleave mid-update.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pdserve.engine.messages import FirstToken, StepReport, TransferDone
from pdserve.router.admission import FinishRate, judge, predict_ttft
from pdserve.router.config import RouterConfig
from pdserve.router.cost_model import CostModel
from pdserve.router.dispatch import Dispatcher
from pdserve.router.metrics import Metrics
from pdserve.router.placement import Ask, Placement, Placer
from pdserve.router.policy import pick_prefill, prefill_locally
from pdserve.router.request import Chunk, Request, State
from pdserve.router.waiting import WaitQueue

log = logging.getLogger("pdserve.router")


class Refused(Exception):
    """Admission refused (RESOURCE_EXHAUSTED): the request's predicted TTFT misses its
    objective, or the wait queue is at its cap."""


class Router:
    """Owns every in-flight request; its ``dispatcher`` places their attempts on the
    worker pools."""

    def __init__(
        self,
        prefill: dict[str, Any],
        decode: dict[str, Any],
        cfg: RouterConfig,
        metrics: Metrics,
        out: Callable[[Request, Chunk], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prefill = prefill  # actor handles by name, shared with the dispatcher
        self.decode = decode
        self.cfg = cfg
        self.metrics = metrics
        self.out = out  # hands a request's next chunk to its client stream
        # Where every time the router reads comes from; ``pdserve tune`` passes the clock of
        # its simulated event loop (the loop that also runs the deadline timers).
        self.clock = clock
        self.dispatcher = Dispatcher(prefill, decode, cfg.local_prefill, metrics, clock)
        self.model = CostModel(cfg.profile, max_batch_tokens=cfg.max_batch_tokens)
        self.placer = Placer(self.model, cfg.max_num_seqs, cfg.block_size,
                             cfg.decode_prefills)
        self.finishes = FinishRate()
        self.requests: dict[str, Request] = {}
        self.waiting = WaitQueue(cfg.scheduler)
        self._order = itertools.count(1)  # admission numbers (Request.order)
        self._pumping = False
        self._repump = False

    # -- admission --------------------------------------------------------------------------
    def admit(self, req: Request) -> None:
        """Queue a validated request; raises Refused when admission turns it away."""
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in flight")
        if len(self.waiting) >= self.cfg.max_waiting:
            raise Refused(f"queue full: {len(self.waiting)} requests already waiting")
        now = self.clock()
        req.order = next(self._order)
        if self.cfg.scheduler == "slo" and self.model.calibrated:
            d = self.dispatcher
            predicted = predict_ttft(self.placer, req, self.waiting.ahead_of(req, now),
                                     d.p_load.values(), d.d_load.values(),
                                     self.finishes.rate(now), now)
            verdict = judge(req, predicted)
            if verdict.refusal:
                raise Refused(verdict.refusal)
            req.predicted_ttft_s = predicted
        req.queued_at = now
        self.requests[req.request_id] = req
        self.waiting.push(req)
        self._update_queue_gauges()
        self._spawn(self._pump())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_failure)

    async def _pump(self) -> None:
        """Dispatch waiting requests while the workers have room."""
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
            self._update_queue_gauges()

    async def _pump_fifo(self) -> None:
        """In arrival order, stopping at the first request no decode worker has room for."""
        while True:
            self.waiting.prune()
            order = self.waiting.ordered(self.clock())
            if not order:
                return
            req = order[0]
            if not await self._try(req, None):
                return

    async def _pump_slo(self) -> None:
        """In the wait queue's order (priority, then TTFT deadline), each request to the
        placement the cost model rates best; one that fits nowhere now does not hold back
        the ones behind it."""
        tight = self._tightest_tpot()
        refused: set[str] = set()  # decode workers that refused a lease this round
        for req in self.waiting.ordered(self.clock()):
            if req.done:
                continue
            if all(d.batch >= self.cfg.max_num_seqs or d.name in refused
                   for d in self.dispatcher.d_load.values()):
                return  # no seat anywhere: the next step report or finish pumps again
            where = self._place(req, tight, refused)
            if where is None:
                continue
            if await self._try(req, where):
                if req.tpot_slo_s and req.lease is not None:
                    w = req.lease.worker
                    tight[w] = min(tight.get(w, math.inf), req.tpot_slo_s)
            else:
                refused.add(where.decode)

    async def _try(self, req: Request, where: Placement | None) -> bool:
        """Dispatch ``req`` (to ``where``, or by the fifo rules); False when it stays
        queued for want of a lease."""
        try:
            ok = await (self.dispatcher.dispatch(req) if where is None
                        else self.dispatcher.dispatch_to(req, where))
        except Exception as e:  # a worker or channel failed: this request fails
            log.exception("dispatch of %s failed", req.request_id)
            if not req.done:
                self._fail(req, "UNAVAILABLE", f"dispatch failed: {e}")
            ok = True
        if ok:
            self.waiting.remove(req)
        return ok

    def _place(self, req: Request, tight: dict[str, float],
               refused: set[str]) -> Placement | None:
        """Where ``req`` goes now, or None if no decode worker has room for it."""
        d = self.dispatcher
        n = len(req.prompt_ids) + len(req.output_ids)
        decode = [w for w in d.d_load.values() if w.name not in refused]
        if not self.model.calibrated:  # no predictions yet: least loaded, by the view
            room = [w for w in decode if self.placer.has_room(w, n)]
            if not room:
                return None
            w = min(room, key=lambda w: (w.batch, w.kv_usage))
            p = d.prefill_worker_for(n)
            return Placement(w.name, p.name if p else None, 0.0, 0.0, 0.0, True, 0.0)
        options = self.placer.options(Ask(n, req.slo), d.p_load.values(), decode, tight)
        rule = self.cfg.local_prefill
        if rule.enabled and d.p_load:  # the static thresholds, where set, decide
            local = prefill_locally(n, pick_prefill(d.p_load.values()), rule)
            options = [o for o in options if (o.prefill is None) == local]
        # Never at the cost of the TPOT objectives of the requests already on a worker.
        options = [o for o in options if o.tpot_s <= tight.get(o.decode, math.inf)]
        return options[0] if options else None

    def _tightest_tpot(self) -> dict[str, float]:
        """Per decode worker, the tightest TPOT objective among the requests it holds."""
        out: dict[str, float] = {}
        for r in self.requests.values():
            if r.lease is not None and r.tpot_slo_s and not r.done:
                w = r.lease.worker
                out[w] = min(out.get(w, math.inf), r.tpot_slo_s)
        return out

    async def open_channels(self) -> None:
        """Open every (prefill, decode) KV channel now, so that no request pays for it."""
        await self.dispatcher.open_channels()

    # -- worker reports ---------------------------------------------------------------------
    def on_first_token(self, msg: FirstToken) -> None:
        # Whether or not the request is still here (a local prefill was never queued).
        self.dispatcher.dequeue(msg.transfer_id)
        if msg.step is not None:  # the prefill step that ended this prompt
            self.model.observe_prefill_step(msg.worker, msg.step.tokens, msg.step.attention,
                                            msg.step.seconds)
        req = self.requests.get(msg.request_id)
        if req is None or req.done or not req.awaiting_first or req.lease is None \
                or req.lease.transfer_id != msg.transfer_id:
            return  # a report from an earlier attempt (preempted or failed since)
        now = self.clock()
        req.awaiting_first = False
        req.prefill_s += msg.prefill_s
        first_ever = not req.output_ids
        if first_ever:
            req.t_first = now
            req.queue_s += msg.queue_s
            self.metrics.observe_first_token(
                now - req.arrival, req.queue_s, msg.prefill_s, 0.0
            )
        else:
            self.metrics.observe_tokens([now - req.t_last])
        req.t_last = now
        req.state = State.TRANSFERRING
        self._emit(req, [msg.token], msg.finish_reason)
        if req.done:
            return
        early, req.early = req.early, []
        for tok, reason in early:
            self._decode_token(req, tok, reason, now)

    def on_transfer_done(self, msg: TransferDone) -> None:
        req = self.requests.get(msg.request_id)
        if msg.ok:
            self.metrics.observe_transfer(msg.seconds, msg.nbytes)
            if req is not None and req.lease is not None and msg.seconds > 0:
                self.model.observe_transfer((msg.worker, req.lease.worker), msg.nbytes,
                                            msg.seconds)
        else:  # a failed prefill step reports no first token, only this
            self.dispatcher.dequeue(msg.transfer_id)
        if req is None or req.done or req.lease is None \
                or req.lease.transfer_id != msg.transfer_id:
            return  # a report from an earlier attempt (retried since)
        if msg.ok:
            req.transfer_s += msg.seconds
        else:
            self.metrics.observe_retry()
            self._retry(req, f"KV transfer failed: {msg.error}")

    def on_step(self, report: StepReport) -> None:
        self.dispatcher.record_step(report)
        if report.step_s > 0 and (report.tokens or report.prefill_tokens):
            self.model.observe_decode_step(report.worker, len(report.tokens),
                                           report.context_tokens, report.step_s,
                                           report.prefill_tokens, report.prefill_attention)
        now = self.clock()
        for rid in report.joined:
            req = self.requests.get(rid)
            if req is not None and not req.done and req.state == State.TRANSFERRING:
                req.state = State.DECODING
        itls = []
        for out in report.tokens:
            req = self.requests.get(out.request_id)
            if req is None or req.done or req.lease is None \
                    or req.lease.worker != report.worker \
                    or req.lease.transfer_id != out.transfer_id:
                continue  # finished, aborted, or from an earlier attempt
            if req.awaiting_first:  # the prefill worker's report is still on its way
                req.early.append((out.token, out.finish_reason))
                continue
            itls.append(now - req.t_last)
            self._decode_token(req, out.token, out.finish_reason, now)
        if itls:
            self.metrics.observe_tokens(itls)
        for rid in report.preempted:
            req = self.requests.get(rid)
            if req is not None and not req.done:
                self.metrics.observe_preemption()
                self._retry(req, "preempted", failed=False)
        for rid, tid, why in report.failed:
            req = self.requests.get(rid)
            # The prefill worker may have reported the same broken transfer (and the
            # request been re-dispatched) already: only the current attempt's counts.
            if req is not None and not req.done and req.lease is not None \
                    and req.lease.worker == report.worker and req.lease.transfer_id == tid:
                self.metrics.observe_retry()
                self._retry(req, why)
        if report.preempted or report.failed or any(t.finish_reason for t in report.tokens):
            self._spawn(self._pump())

    def _decode_token(self, req: Request, tok: int, reason: str | None, now: float) -> None:
        req.state = State.DECODING
        req.t_last = now
        self._emit(req, [tok], reason)

    def _retry(self, req: Request, why: str, failed: bool = True) -> None:
        """Re-prefill prompt + generated tokens elsewhere (recompute), or fail once
        ``max_attempts`` attempts failed (a preemption, ``failed=False``, is not counted).
        Either way the attempt that ends here is aborted on both of its workers."""
        if req.lease is not None and req.prefill_worker:
            # It may still be queued or prefilling there (a lease that expired, the decode
            # end of a transfer that broke): stop it, by its transfer id so that the abort
            # cannot hit the next attempt, and count its prompt out of that worker's queue.
            tid = req.lease.transfer_id
            self.prefill[req.prefill_worker].abort.remote(req.request_id, tid)
            self.dispatcher.dequeue(tid)
        if failed:
            req.failures += 1
        if req.failures >= self.cfg.max_attempts:
            self._fail(req, "UNAVAILABLE",
                       f"request failed after {req.failures} failed attempts: {why}")
            return
        log.info("re-dispatching %s: %s", req.request_id, why)
        if req.lease is not None:
            self.dispatcher.dequeue(req.lease.transfer_id)  # a local prefill left undone
            # The next reserve waits for this (see Dispatcher.dispatch).
            req.releasing = self.decode[req.lease.worker].abort.remote(
                req.request_id, req.lease.transfer_id)
        req.lease = None
        req.state = State.QUEUED
        self.waiting.push_retry(req)
        self._spawn(self._pump())

    # -- output -----------------------------------------------------------------------------
    def _emit(self, req: Request, ids: list[int], reason: str | None) -> None:
        text, stop = req.add_tokens(ids)
        matched: str | int | None = None
        if stop is not None:
            reason, matched = "stop", stop
        elif reason == "stop":
            matched = ids[-1]
        if reason is None:
            self.out(req, Chunk(ids, text))
            return
        self.out(req, Chunk(ids, text + req.flush(), reason, matched))
        self._finish(req, State.FINISHED, reason)

    def _finish(self, req: Request, state: State, reason: str) -> None:
        req.state = state
        self.requests.pop(req.request_id, None)
        now = self.clock()
        if state == State.FINISHED:
            self.finishes.observe(now)
        _cancel_deadline(req)
        if req.lease is not None:
            # A stop string, a first token that ends the request, or an abort leave the
            # sequence (or its lease) on the decode worker; when the worker finished it
            # itself, this finds nothing there.
            self.decode[req.lease.worker].abort.remote(req.request_id, req.lease.transfer_id)
        n = len(req.output_ids)
        tpot = (req.t_last - req.t_first) / (n - 1) if n > 1 and req.t_first else 0.0
        ttft = req.t_first - req.arrival if req.t_first else None
        self.metrics.observe_finished(
            reason=reason, e2e_s=now - req.arrival,
            decode_s=(req.t_last - req.t_first) if req.t_first else 0.0, mean_tpot_s=tpot,
            prompt_tokens=len(req.prompt_ids), completion_tokens=n,
            slo=req.slo, ttft_s=ttft,
        )
        self._update_queue_gauges()

    def _fail(self, req: Request, code: str, message: str) -> None:
        self.out(req, Chunk([], req.flush(), error=(code, message)))
        req.state = State.FAILED
        self.requests.pop(req.request_id, None)
        _cancel_deadline(req)
        if req.lease is not None:
            self.decode[req.lease.worker].abort.remote(req.request_id, req.lease.transfer_id)
        self.metrics.observe_failure(code)
        self._update_queue_gauges()

    def abort(self, request_id: str, reason: str = "abort", code: str | None = None) -> bool:
        """End a request now: free its work on both workers. With ``code`` the stream ends
        with that gRPC status (deadline), otherwise with finish_reason ``reason``."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        if req.prefill_worker:
            self.prefill[req.prefill_worker].abort.remote(request_id)
            # What the prefill worker drops now never reports a first token.
            self.dispatcher.dequeue_request(request_id, req.prefill_worker)
        if req.lease is not None:  # nor a prompt its decode worker prefills itself
            self.dispatcher.dequeue(req.lease.transfer_id)
        if code is not None:
            self._fail(req, code, f"request {request_id}: {reason}")
        else:
            self.out(req, Chunk([], req.flush(), "abort"))
            self._finish(req, State.ABORTED, "abort")
        return True

    def abort_all(self, reason: str) -> None:
        for rid in list(self.requests):
            self.abort(rid, reason, "UNAVAILABLE")

    def _update_queue_gauges(self) -> None:
        waiting = sum(1 for r in self.waiting if not r.done)
        self.metrics.set_queue(running=len(self.requests) - waiting, waiting=waiting)

    def set_deadline(self, req: Request, seconds: float) -> None:
        """End ``req`` with DEADLINE_EXCEEDED in ``seconds`` unless it ends before (its
        timer is cancelled then, however it ends)."""
        req.deadline_timer = asyncio.get_running_loop().call_later(
            max(0.0, seconds), self.deadline_callback(req))

    def deadline_callback(self, req: Request) -> Callable[[], None]:
        """What ``req``'s deadline timer runs: a no-op unless ``req`` itself (not a later
        request with the same id) is still in flight."""
        def expire() -> None:
            if self.requests.get(req.request_id) is req:
                self.abort(req.request_id, "deadline exceeded", "DEADLINE_EXCEEDED")

        return expire


def _cancel_deadline(req: Request) -> None:
    if req.deadline_timer is not None:
        req.deadline_timer.cancel()
        req.deadline_timer = None


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("router task failed", exc_info=task.exception())
