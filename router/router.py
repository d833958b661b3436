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
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from pdserve.engine.messages import FirstToken, StepReport, TransferDone
from pdserve.router.config import RouterConfig
from pdserve.router.dispatch import Dispatcher
from pdserve.router.metrics import Metrics
from pdserve.router.request import Chunk, Request, State

log = logging.getLogger("pdserve.router")


class QueueFull(Exception):
    """Admission refused: the bounded wait queue is full."""


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
    ) -> None:
        self.prefill = prefill  # actor handles by name, shared with the dispatcher
        self.decode = decode
        self.cfg = cfg
        self.metrics = metrics
        self.out = out  # hands a request's next chunk to its client stream
        self.dispatcher = Dispatcher(prefill, decode, cfg.local_prefill, metrics)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self._pumping = False
        self._repump = False
        self._orders = itertools.count()  # admission numbers (Request.order)

    # -- admission --------------------------------------------------------------------------
    def admit(self, req: Request) -> None:
        """Queue a validated request; raises QueueFull when the wait queue is at its cap."""
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in flight")
        if len(self.waiting) >= self.cfg.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests already waiting")
        req.queued_at = time.monotonic()
        req.order = next(self._orders)
        self.requests[req.request_id] = req
        self.waiting.append(req)
        self._update_queue_gauges()
        self._spawn(self._pump())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_failure)

    async def _pump(self) -> None:
        """Dispatch waiting requests in order while some decode worker grants a lease."""
        if self._pumping:
            self._repump = True
            return
        self._pumping = True
        try:
            while True:
                self._repump = False
                while self.waiting:
                    req = self.waiting[0]
                    if req.done:
                        self.waiting.popleft()
                        continue
                    try:
                        if not await self.dispatcher.dispatch(req):
                            break
                    except Exception as e:  # a worker or channel failed: this request fails
                        log.exception("dispatch of %s failed", req.request_id)
                        if not req.done:
                            self._fail(req, "UNAVAILABLE", f"dispatch failed: {e}")
                    # A preempted request may have been put in front meanwhile.
                    if req in self.waiting:
                        self.waiting.remove(req)
                if not self._repump:
                    break
        finally:
            self._pumping = False
            self._update_queue_gauges()

    async def open_channels(self) -> None:
        """Open every (prefill, decode) KV channel now, so that no request pays for it."""
        await self.dispatcher.open_channels()

    # -- worker reports ---------------------------------------------------------------------
    def on_first_token(self, msg: FirstToken) -> None:
        # Whether or not the request is still here (a local prefill was never queued).
        self.dispatcher.dequeue(msg.transfer_id)
        req = self.requests.get(msg.request_id)
        if req is None or req.done or not req.awaiting_first or req.lease is None \
                or req.lease.transfer_id != msg.transfer_id:
            return  # a report from an earlier attempt (preempted or failed since)
        now = time.monotonic()
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
        now = time.monotonic()
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
            # The next reserve waits for this (see Dispatcher.dispatch).
            req.releasing = self.decode[req.lease.worker].abort.remote(
                req.request_id, req.lease.transfer_id)
        req.lease = None
        req.state = State.QUEUED
        self.waiting.appendleft(req)
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
        _cancel_deadline(req)
        if req.lease is not None:
            # A stop string, a first token that ends the request, or an abort leave the
            # sequence (or its lease) on the decode worker; when the worker finished it
            # itself, this finds nothing there.
            self.decode[req.lease.worker].abort.remote(req.request_id, req.lease.transfer_id)
        now = time.monotonic()
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
