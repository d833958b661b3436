"""A simulated decode worker: ``decode_worker.worker.DecodeWorker`` with the forward pass
replaced by simulated time.

It holds the real :class:`~pdserve.decode_worker.scheduler.DecodeScheduler` over a real
block allocator and drives it as the real worker's step loop does: pending aborts, lease
expiry, ``schedule`` (continuous batching, preemption of the youngest request when blocks
run out), the local-prefill chunks under what the batch leaves of the token budget, then
after the step ``postprocess``, the first tokens of prompts prefilled here, and ONE
``StepReport`` to the router with the same fields (the step's seconds included, so the
router's online correction sees what it sees in a real deployment). A step lasts what
:class:`~pdserve.cluster.tune.steps.StepTimes` says; its tokens are ``DUMMY_TOKEN``.

KV arrives from a simulated prefill worker (``receive_begin`` when its header would, then
``receive_end``); an abort of a sequence in the running step or being received waits for
that to end, as on the real worker.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pdserve.cluster.tune.steps import DUMMY_TOKEN, StepTimes
from pdserve.decode_worker.scheduler import DecodeScheduler, DecodeSeq, PrefillChunk, StepPlan
from pdserve.engine.chunking import attention_work
from pdserve.engine.config import WorkerConfig
from pdserve.engine.first_token import FirstTokenReporter
from pdserve.engine.kv_cache import BlockAllocator
from pdserve.engine.messages import Lease, PrefillTask, Reservation, StepReport, WorkerStats


class SimDecodeWorker:
    """One decode worker (or colocated replica) on simulated time."""

    def __init__(self, name: str, cfg: WorkerConfig, times: StepTimes, router: Any,
                 loop: asyncio.AbstractEventLoop, first_transfer_id: int) -> None:
        self.name = name
        self.cfg = cfg
        self.times = times
        self.router = router
        self.loop = loop
        self._first_token = FirstTokenReporter(name, router.on_first_token.remote)
        self.allocator = BlockAllocator(cfg.cache.num_blocks)
        self.sched = DecodeScheduler(
            self.allocator, cfg.cache.block_size, name, cfg.max_num_seqs,
            cfg.lease_timeout_s, clock=loop.time, first_transfer_id=first_transfer_id)
        self._busy: set[str] = set()  # in the running step or being received
        self._pending_abort: set[str] = set()
        self._joined: list[str] = []
        self._failed: list[tuple[str, int, str]] = []
        self._submitted: dict[int, tuple[float, float]] = {}  # local prefill: (arrived, started)
        self._receiving: dict[int, str] = {}  # transfer id -> request id
        self._stepping = False
        self._kicked = False
        self._expiry: asyncio.TimerHandle | None = None
        self.steps = 0
        self.preemptions = 0

    # -- control (the router's calls) -------------------------------------------------------
    def host_channel(self, prefill_name: str) -> tuple[str, int, str]:
        return "sim", 0, f"{prefill_name}@{self.name}"

    def submit(self, task: PrefillTask) -> None:
        if not self.cfg.local_prefill:
            raise RuntimeError(f"{self.name} is a decode-only worker (local_prefill is off)")
        if self.sched.start_prefill(task.lease.transfer_id, list(task.token_ids)):
            self._submitted[task.lease.transfer_id] = (self.loop.time(), 0.0)
            self._kick()

    def reserve(self, r: Reservation) -> Lease | None:
        lease = self.sched.reserve(r)
        if lease is not None:
            self._watch_leases()
        return lease

    def abort(self, request_id: str, transfer_id: int | None = None) -> bool:
        if self.sched.find(request_id, transfer_id) is None:
            return False
        if request_id in self._busy:
            self._pending_abort.add(request_id)
        else:
            self.sched.release(request_id)
        return True

    def stats(self) -> WorkerStats:
        return self.sched.stats("simulated")

    # -- KV receive (the prefill worker's transfer) -----------------------------------------
    def receive_begin(self, transfer_id: int) -> None:
        """A transfer's header arrives: a lease that no longer holds it refuses it."""
        seq = self.sched.lease(transfer_id)
        if seq is not None:
            self._receiving[transfer_id] = seq.request_id
            self._busy.add(seq.request_id)

    def receive_end(self, transfer_id: int, first_token: int | None) -> None:
        """The transfer's last byte arrived (``first_token`` None: the sender cancelled it)."""
        rid = self._receiving.pop(transfer_id, None)
        if rid is None:
            return  # refused at its header: the sender's data was discarded
        self._busy.discard(rid)
        if first_token is None or rid in self._pending_abort:
            self._pending_abort.discard(rid)
            if self.sched.release(rid) and first_token is None:
                self._failed.append((rid, transfer_id, "KV transfer failed: cancelled"))
        elif self.sched.activate(transfer_id, first_token):
            self._joined.append(rid)
        self._kick()

    # -- step loop --------------------------------------------------------------------------
    def _kick(self) -> None:
        if not self._stepping and not self._kicked:
            self._kicked = True
            self.loop.call_soon(self._step)

    def _watch_leases(self) -> None:
        """Wake up when the earliest lease waiting for its KV expires (the real loop looks
        every 50 ms)."""
        due = min((s.deadline for s in self.sched.reserved.values()), default=float("inf"))
        if due == float("inf"):
            return
        if self._expiry is not None:
            if self._expiry.when() <= due:
                return
            self._expiry.cancel()
        self._expiry = self.loop.call_at(due, self._expired)

    def _expired(self) -> None:
        self._expiry = None
        self._kick()
        self._watch_leases()

    def _step(self) -> None:
        self._kicked = False
        for rid in list(self._pending_abort):
            if rid not in self._busy:
                self._pending_abort.discard(rid)
                self.sched.release(rid)
        for rid, tid in self.sched.expire():
            self._failed.append((rid, tid, "KV did not arrive before the lease expired"))
        plan = self.sched.schedule()
        if self.cfg.local_prefill:  # prompt chunks share the step's token budget
            plan.chunks = self.sched.schedule_prefill(self.cfg.max_batch_tokens - len(plan.batch))
        if not plan.batch and not plan.chunks and not plan.preempted and not self._failed:
            self._watch_leases()
            return  # idle until a call or a transfer kicks the loop
        joined, self._joined = self._joined, []
        failed, self._failed = self._failed, []
        in_step = {s.request_id for s in plan.batch} | {c.seq.request_id for c in plan.chunks}
        self._busy |= in_step
        context = sum(s.num_tokens for s in plan.batch)
        prompt_tokens = sum(c.length for c in plan.chunks)
        prompt_attention = attention_work((c.start, c.length) for c in plan.chunks)
        step_s = self.times.decode_step_s(len(plan.batch), context, prompt_tokens,
                                          prompt_attention)
        self._stepping = True
        self.loop.call_later(step_s, self._end_step, plan, in_step, joined, failed,
                             (context, prompt_tokens, prompt_attention), self.loop.time())

    def _end_step(self, plan: StepPlan, in_step: set[str], joined: list[str],
                  failed: list[tuple[str, int, str]], work: tuple[int, int, int],
                  t0: float) -> None:
        self._stepping = False
        self.steps += 1
        self.preemptions += len(plan.preempted)
        batch = plan.batch
        outs = self.sched.postprocess(batch, [DUMMY_TOKEN] * len(batch))
        if plan.chunks:
            self._first_tokens(plan.chunks, t0)
        self._busy -= in_step
        context, prompt_tokens, prompt_attention = work
        self.router.on_step.remote(StepReport(
            worker=self.name, tokens=outs, joined=joined, preempted=plan.preempted,
            failed=failed, step_s=self.loop.time() - t0, num_running=len(self.sched.running),
            num_free_blocks=self.allocator.num_free, kv_usage=self.allocator.usage,
            context_tokens=context, prefill_tokens=prompt_tokens,
            prefill_attention=prompt_attention,
            num_waiting=len(self.sched.reserved) + len(self.sched.ready),
        ))
        self._step()  # the loop goes straight on to the next step

    def _first_tokens(self, chunks: list[PrefillChunk], t0: float) -> None:
        """Local prefill: report first tokens; finished prompts join (as the real worker)."""
        now = self.loop.time()
        for c in chunks:
            arrived, started = self._submitted.get(c.seq.transfer_id, (t0, 0.0))
            if not started:
                self._submitted[c.seq.transfer_id] = (arrived, t0)
        seq: DecodeSeq
        for seq in self.sched.prefilled(chunks):
            arrived, started = self._submitted.pop(seq.transfer_id, (t0, t0))
            reason = self._first_token.report(
                seq.request_id, seq.transfer_id, DUMMY_TOKEN, seq.sampling, seq.num_generated,
                arrived=arrived, started=started, now=now)
            if reason is None:
                self.sched.activate(seq.transfer_id, DUMMY_TOKEN)
            else:
                self.sched.release(seq.request_id)
