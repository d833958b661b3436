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
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pdserve.engine.messages import FirstToken, StepReport, TokenLogprobs, TransferDone
from pdserve.router.config import RouterConfig
from pdserve.router.cost_model import CostModel
from pdserve.router.dispatch import Dispatcher
from pdserve.router.fanout import Families
from pdserve.router.load import LoadWindow
from pdserve.router.metrics import Metrics
from pdserve.router.prefix_index import PrefixIndex
from pdserve.router.request import Chunk, Request, State
from pdserve.router.request_metrics import RequestMetrics
from pdserve.router.scheduler import Scheduler
from pdserve.router.waiting import WaitQueue

log = logging.getLogger("pdserve.router")


class Router:
    """Owns every in-flight request; its ``dispatcher`` places their attempts on the
    worker pools."""

    def __init__(self, prefill: dict[str, Any], decode: dict[str, Any], cfg: RouterConfig,
                 metrics: Metrics, out: Callable[[Request, Chunk], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.prefill = prefill  # actor handles by name, shared with the dispatcher
        self.decode = decode
        self.cfg = cfg
        self.metrics = metrics
        self.observe = RequestMetrics(metrics)  # a request's end and its KV transfer
        self.out = out  # hands a request's next chunk to its client stream
        # Where every time the router reads comes from; ``pdserve tune`` passes the clock of
        # its simulated event loop (the loop that also runs the deadline timers).
        self.clock = clock
        self.dispatcher = Dispatcher(prefill, decode, cfg.local_prefill, metrics, clock,
                                     PrefixIndex(cfg.block_size, cfg.prefix_caching))
        self.dispatcher.channels.on_open = self.pump  # a reopened channel: room for more
        self.model = CostModel(cfg.profile, max_batch_tokens=cfg.max_batch_tokens)
        self.requests: dict[str, Request] = {}
        self.families = Families()  # n > 1: the children of each parent in flight
        self.load = LoadWindow()  # what the autoscaler reads (router.pools.load_snapshot)
        self.scheduler = Scheduler(cfg, self.dispatcher, self.model, self.requests,
                                   self._fail, self._update_queue_gauges, self._spawn, clock)

    @property
    def waiting(self) -> WaitQueue:
        return self.scheduler.waiting

    # -- admission --------------------------------------------------------------------------
    def admit(self, req: Request) -> None:
        """Queue a validated request; raises Refused when admission turns it away."""
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in flight")
        self.scheduler.admit(req)
        self.requests[req.request_id] = req
        self.load.arrived(self.clock(), len(req.prompt_ids))
        self._update_queue_gauges()
        self._spawn(self.scheduler.pump())

    def withdraw(self, req: Request) -> None:
        """Take back a request just admitted and not dispatched yet (the pump runs later):
        the rest of its call was refused (``router.fanout``)."""
        req.state = State.ABORTED
        self.requests.pop(req.request_id, None)
        self._update_queue_gauges()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_failure)

    async def open_channels(self) -> None:
        """Open every (prefill, decode) KV channel now, so that no request pays for it."""
        await self.dispatcher.open_channels()

    # -- worker reports ---------------------------------------------------------------------
    def on_first_token(self, msg: FirstToken) -> None:
        if msg.step is not None:  # the prefill step that ended this prompt
            self.dispatcher.prefill_step_ended(msg.worker, msg.step.tokens)
            self.model.observe_prefill_step(msg.worker, msg.step.tokens, msg.step.attention,
                                            msg.step.seconds)
        # Whether or not the request is still here (a local prefill was never queued).
        self.dispatcher.dequeue(msg.transfer_id)
        req = self.requests.get(msg.request_id)
        if req is None or req.done or not req.awaiting_first or req.lease is None \
                or req.lease.transfer_id != msg.transfer_id:
            return  # a report from an earlier attempt (preempted or failed since)
        now = self.clock()
        req.awaiting_first = False
        req.prefill_s += msg.prefill_s
        self.observe.prefilled(msg, self.decode)
        first_ever = not req.output_ids
        if first_ever:
            req.t_first = now
            req.queue_s += msg.queue_s
            self.metrics.observe_first_token(now - req.arrival, req.queue_s, msg.prefill_s)
            self.scheduler.observe_ttft(req, now - req.arrival)
        else:
            self.metrics.observe_tokens([now - req.t_last])
        req.t_last = now
        req.state = State.TRANSFERRING
        self._emit(req, [msg.token], msg.finish_reason, msg.logprobs)
        if req.done:
            return
        early, req.early = req.early, []
        for tok, reason, lp in early:
            self._decode_token(req, tok, reason, now, lp)

    def on_transfer_done(self, msg: TransferDone) -> None:
        req = self.requests.get(msg.request_id)
        if msg.ok:
            self.metrics.observe_transfer(msg.seconds, msg.nbytes)
            if req is not None and req.lease is not None and msg.seconds > 0:
                self.model.observe_transfer((msg.worker, req.lease.worker), msg.nbytes,
                                            msg.seconds)
        else:  # a failed prefill step reports no first token, only this
            self.dispatcher.dequeue(msg.transfer_id)
            if msg.broken_channel:  # reopened under a new name; the pair waits for it
                self.dispatcher.channels.broken(msg.broken_channel, msg.error)
        self.observe.transfer_done(req, msg)
        if req is None or req.done or req.lease is None \
                or req.lease.transfer_id != msg.transfer_id:
            return  # a report from an earlier attempt (retried since)
        if msg.ok:
            req.transfer_s += msg.seconds
        else:
            self.metrics.observe_retry()
            self.retry(req, f"KV transfer failed: {msg.error}")

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
                req.early.append((out.token, out.finish_reason, out.logprobs))
                continue
            itls.append(now - req.t_last)
            self._decode_token(req, out.token, out.finish_reason, now, out.logprobs)
        if itls:
            self.metrics.observe_tokens(itls)
        for rid in report.preempted:
            req = self.requests.get(rid)
            if req is not None and not req.done:
                self.metrics.observe_preemption()
                self.retry(req, "preempted", failed=False)
        for rid, tid, why in report.failed:
            req = self.requests.get(rid)
            # The prefill worker may have reported the same broken transfer (and the
            # request been re-dispatched) already: only the current attempt's counts.
            if req is not None and not req.done and req.lease is not None \
                    and req.lease.worker == report.worker and req.lease.transfer_id == tid:
                self.metrics.observe_retry()
                self.retry(req, why)
        if report.preempted or report.failed or any(t.finish_reason for t in report.tokens):
            self._spawn(self.scheduler.pump())

    def _decode_token(self, req: Request, tok: int, reason: str | None, now: float,
                      logprobs: TokenLogprobs | None) -> None:
        req.state = State.DECODING
        req.t_last = now
        self._emit(req, [tok], reason, logprobs)

    def retry(self, req: Request, why: str, failed: bool = True) -> None:
        """Re-prefill prompt + generated tokens elsewhere (recompute), or fail once
        ``max_attempts`` attempts failed (a preemption, ``failed=False``, is not counted).
        Either way the attempt that ends here is aborted on both of its workers."""
        if req.lease is not None and req.prefill_worker:
            # It may still be queued or prefilling there (a lease that expired, the decode
            # end of a transfer that broke): stop it, by its transfer id so that the abort
            # cannot hit the next attempt, and count its prompt out of that worker's queue.
            tid = req.lease.transfer_id
            abort_on(self.prefill, req.prefill_worker, req.request_id, tid)
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
            req.releasing = abort_on(self.decode, req.lease.worker, req.request_id,
                                           req.lease.transfer_id)
        req.lease = None
        req.state = State.QUEUED
        self.scheduler.requeue(req)
        self._spawn(self.scheduler.pump())

    # -- output -----------------------------------------------------------------------------
    def _emit(self, req: Request, ids: list[int], reason: str | None,
              logprobs: TokenLogprobs | None) -> None:
        if len(req.output_ids) == 1:  # the second token (t_last: now, as it arrived)
            self.metrics.observe_first_decode_step(req.t_last - req.t_first)
        text, stop = req.add_tokens(ids)
        lps = None if logprobs is None else [logprobs]
        matched: str | int | None = None
        if stop is not None:
            reason, matched = "stop", stop
        elif reason == "stop":
            matched = ids[-1]
        if reason is None:
            self.out(req, Chunk(ids, text, logprobs=lps))
            return
        self.out(req, Chunk(ids, text + req.flush(), reason, matched, logprobs=lps))
        self._finish(req, State.FINISHED, reason)

    def _finish(self, req: Request, state: State, reason: str,
                failure: str | None = None) -> None:
        """End ``req`` with finish reason ``reason``; counted as a failure with the gRPC
        status ``failure`` instead if given (its client went away)."""
        req.state = state
        self.requests.pop(req.request_id, None)
        self.families.ended(req.request_id)
        now = self.clock()
        if state == State.FINISHED:
            self.scheduler.finishes.observe(now)
            self.load.request_finished(req, now)
            self.dispatcher.prefix.finished(req)
        _cancel_deadline(req)
        if req.lease is not None:
            # A stop string, a first token that ends the request, or an abort leave the
            # sequence (or its lease) on the decode worker; when the worker finished it
            # itself, this finds nothing there.
            abort_on(self.decode, req.lease.worker, req.request_id,
                           req.lease.transfer_id)
        if failure is None:
            self.observe.finished(req, reason, now)
        else:
            self.observe.failed(req, failure)
        self._update_queue_gauges()

    def _fail(self, req: Request, code: str, message: str) -> None:
        """End ``req`` with the gRPC status ``code``; its siblings (n > 1) with it: the
        call's stream ends with one status."""
        siblings = self.families.siblings(req.request_id)
        self.out(req, Chunk([], req.flush(), error=(code, message)))
        req.state = State.FAILED
        self.requests.pop(req.request_id, None)
        self.families.ended(req.request_id)
        _cancel_deadline(req)
        if req.lease is not None:
            abort_on(self.decode, req.lease.worker, req.request_id,
                           req.lease.transfer_id)
        self.observe.failed(req, code)
        self._update_queue_gauges()
        for rid in siblings:
            sib = self.requests.get(rid)
            if sib is not None and not sib.done:
                self._stop_prefill(rid)
                self._fail(sib, code, message)

    def abort(self, request_id: str, reason: str = "abort", code: str | None = None) -> bool:
        """End a request now: free its work on both workers. With ``code`` the stream ends
        with that gRPC status (deadline), otherwise with finish_reason ``reason``."""
        req = self._stop_prefill(request_id)
        if req is None:
            return False
        if code is not None:
            self._fail(req, code, f"request {request_id}: {reason}")
        else:
            self.out(req, Chunk([], req.flush(), "abort"))
            self._finish(req, State.ABORTED, "abort")
        return True

    def client_gone(self, request_id: str, code: str) -> bool:
        """The client's call ended on its frontend before the request did (``code``:
        CANCELLED, or DEADLINE_EXCEEDED once its deadline passed): free its work as
        ``abort`` does; nothing is sent (its stream is closed), and it counts as a failure
        with ``code``, not as finished."""
        req = self._stop_prefill(request_id)
        if req is None:
            return False
        self._finish(req, State.ABORTED, "abort", failure=code)
        return True

    def _stop_prefill(self, request_id: str) -> Request | None:
        """The request in flight as ``request_id`` (None if none), its prompt dropped from
        its prefill worker and from the queue counts (``_finish`` frees its decode side)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.prefill_worker:
            abort_on(self.prefill, req.prefill_worker, request_id)
            # What the prefill worker drops now never reports a first token.
            self.dispatcher.dequeue_request(request_id, req.prefill_worker)
        if req.lease is not None:  # nor a prompt its decode worker prefills itself
            self.dispatcher.dequeue(req.lease.transfer_id)
        return req

    def pump(self) -> None:
        """Dispatch what waits, soon (e.g. a worker joined and has room)."""
        self._spawn(self.scheduler.pump())

    def abort_all(self, reason: str) -> None:
        for rid in list(self.requests):
            self.abort(rid, reason, "UNAVAILABLE")

    def _update_queue_gauges(self) -> None:
        waiting = self.scheduler.num_waiting()
        self.metrics.set_queue(running=len(self.requests) - waiting, waiting=waiting)

def set_deadline(router: Router, req: Request, seconds: float) -> None:
    """End ``req`` with DEADLINE_EXCEEDED in ``seconds`` unless it ends before (its timer is
    cancelled then, however it ends)."""
    req.deadline_timer = asyncio.get_running_loop().call_later(
        max(0.0, seconds), deadline_callback(router, req))


def deadline_callback(router: Router, req: Request) -> Callable[[], None]:
    """What ``req``'s deadline timer runs: a no-op unless ``req`` itself (not a later request
    with the same id) is still in flight."""
    def expire() -> None:
        if router.requests.get(req.request_id) is req:
            router.abort(req.request_id, "deadline exceeded", "DEADLINE_EXCEEDED")

    return expire


def abort_on(pool: dict[str, Any], worker: str, request_id: str,
             transfer_id: int | None = None) -> Any:
    """Abort the attempt on ``worker`` unless that worker left the deployment since (its
    attempts ended with it); the call's reference, or None."""
    handle = pool.get(worker)
    args = (request_id,) if transfer_id is None else (request_id, transfer_id)
    return None if handle is None else handle.abort.remote(*args)


def _cancel_deadline(req: Request) -> None:
    if req.deadline_timer is not None:
        req.deadline_timer.cancel()
        req.deadline_timer = None


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("router task failed", exc_info=task.exception())
