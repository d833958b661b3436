"""The decode worker: a Ray actor that holds leases, receives KV, and runs the step loop.

With ``WorkerConfig.local_prefill`` it also prefills the prompts the router hands it
(``submit``), in chunks mixed into its decode steps: every prompt in colocated mode, some
under conditional disaggregation (the rest still arrive as KV over the channels).

Threads: Ray's (control calls: reserve, abort, stats), one receiver per channel
(header -> reservation match -> per-layer payload -> unpack -> checksum), and the step loop
(continuous batching; ONE report to the router per step). The scheduler and allocator are
touched only under ``self._cv``; blocks of a sequence in the running step or being received
are freed only once that work is over, so a freed block is never written to afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
import uuid
from typing import Any

import torch

from pdserve.decode_worker.kv_receiver import ReceiverChannels
from pdserve.decode_worker.scheduler import DecodeScheduler, DecodeSeq, PrefillChunk
from pdserve.engine.chunking import attention_work
from pdserve.engine.config import WorkerConfig, blocks_for
from pdserve.engine.device import describe_device
from pdserve.engine.first_token import FirstTokenReporter
from pdserve.engine.kv import (
    ChannelSpec,
    KVReceiver,
    TransferError,
    TransferHeader,
    TransferTimeout,
    host_store,
    match_header,
    open_receiver,
)
from pdserve.engine.messages import (
    Lease,
    PrefillTask,
    Reservation,
    StepReport,
    TokenLogprobs,
    WorkerStats,
)
from pdserve.engine.runner import DecodeItem, ModelRunner, PrefillItem
from pdserve.engine.sampler import Sampled, sample_batch
from pdserve.engine.teardown import SHUTDOWN_GRACE_S, abort_channels, join_threads
from pdserve.engine.warmup import SLOW_STEP_S, report_late_compiles, start_runner, warm_up

log = logging.getLogger("pdserve.decode")


class DecodeWorker:
    """One decode worker (hosted in a Ray actor by ``cluster.launch``)."""

    def __init__(self, name: str, cfg: WorkerConfig, router: Any, epoch: int = 0) -> None:
        self.name = name
        self.cfg = cfg
        self.router = router
        self._first_token = FirstTokenReporter(name, router.on_first_token.remote)
        self.model_config, self.runner, self.allocator = start_runner(cfg)
        self.sched = DecodeScheduler(
            self.allocator, cfg.cache.block_size, name, cfg.max_num_seqs,
            cfg.lease_timeout_s, epoch,
            # Transfer ids from a random base: unique across decode workers in practice, so
            # the router can tell one attempt of a request from the next by id alone.
            first_transfer_id=secrets.randbits(40) << 12, salt=self.runner.fingerprint,
        )
        self._cv = threading.Condition()
        self._stop = False
        self._busy: set[str] = set()  # in the running step or being received
        self._pending_abort: set[str] = set()
        self._joined: list[str] = []
        self._failed: list[tuple[str, int, str]] = []  # (request id, transfer id, why)
        # Prompts submitted for local prefill, by transfer id: (arrived, started) times.
        self._submitted: dict[int, tuple[float, float]] = {}
        self._channels = ReceiverChannels()
        self._loop = threading.Thread(target=self._run, name="decode-loop", daemon=True)

    # -- control (Ray calls) ----------------------------------------------------------------
    def start(self) -> WorkerStats:
        self._warmup()
        self._loop.start()
        return self.stats()

    def host_channel(self, prefill_name: str) -> tuple[str, int, str]:
        """Host the store of a new channel from ``prefill_name`` (replacing an earlier one
        from it); a thread opens it once the prefill worker joins, then receives on it.
        Returns (host, port, a fresh name ``{prefill}@{decode}:e{epoch}.{nonce}``)."""
        timeout = self.cfg.transfer_timeout_s
        store, port = host_store(self.cfg.host, 0, timeout)
        name = f"{prefill_name}@{self.name}:e{self.sched.epoch}.{uuid.uuid4().hex[:8]}"
        spec = ChannelSpec.from_configs(self.model_config, self.cfg.cache,
                                        self.runner.fingerprint)

        def open_and_serve() -> None:
            try:
                ch = open_receiver(
                    store=store, name=name, secret=self.cfg.secret, spec=spec,
                    device=self.runner.device,
                    timeout_s=timeout, gloo_host=self.cfg.host, owns_store=True,
                )
            except Exception:
                log.exception("channel %s failed to open", name)
                return
            with self._cv:  # shutdown() aborts the channels it finds here; a later one, we do
                stopping = self._stop
                if not stopping:
                    self._channels.add(prefill_name, ch)
            if stopping:
                ch.close(abort=True)
                return
            self._receive_loop(ch)
            self._channels.ended(prefill_name, ch)

        threading.Thread(target=open_and_serve, name=f"kv-recv-{prefill_name}",
                         daemon=True).start()
        return self.cfg.host, port, name

    def close_channel(self, prefill_name: str) -> bool:
        """Close the channel from ``prefill_name`` (that worker drains away, or this one
        does); True if there was one. Its receive thread ends (and the next step report
        names it: the router reopens the pair if both workers still serve)."""
        ch = self._channels.pop(prefill_name)
        if ch is None:
            return False
        ch.close(abort=True)
        return True

    def channels(self) -> dict[str, tuple[str, bool]]:
        """Each KV channel's name and whether it is open, by prefill worker."""
        return self._channels.names()

    def submit(self, task: PrefillTask) -> None:
        """Prefill ``task`` here, under the lease this worker granted it (local prefill:
        colocated mode, or conditional disaggregation)."""
        if not self.cfg.local_prefill:
            raise RuntimeError(f"{self.name} is a decode-only worker (local_prefill is off)")
        with self._cv:
            if self.sched.start_prefill(task.lease.transfer_id, list(task.token_ids)):
                self._submitted[task.lease.transfer_id] = (time.monotonic(), 0.0)
                self._cv.notify()

    def reserve(self, r: Reservation) -> Lease | None:
        """A lease for ``r``, or None: no room, or the request's previous attempt here
        waits for its deferred abort (the router asks again after the next step)."""
        with self._cv:
            if r.request_id in self._pending_abort:
                return None
            return self.sched.reserve(r)

    def abort(self, request_id: str, transfer_id: int | None = None) -> bool:
        """Free a request's blocks in whatever state it is; True if it was here. With
        ``transfer_id``, only that attempt's (a late abort of an old attempt, Ray running
        a threaded actor's calls concurrently, must not free the next lease)."""
        with self._cv:
            if self.sched.find(request_id, transfer_id) is None:
                return False
            if request_id in self._busy:
                self._pending_abort.add(request_id)
            else:
                self.sched.release(request_id)
            return True

    def stats(self) -> WorkerStats:
        with self._cv:
            return self.sched.stats(describe_device(self.runner.device))

    def shutdown(self) -> None:
        """Stop the threads and abort the KV channels within about ``SHUTDOWN_GRACE_S``
        (``engine.teardown``): the step loop stops after its step (the router aborted every
        request); the aborted channels end any receive at once (a closed one only raises)."""
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        with self._cv:
            self._stop = True
            self._cv.notify_all()
            channels = self._channels.all()
        stuck = join_threads([self._loop], deadline)
        stuck += abort_channels(channels, deadline)
        if stuck:
            log.warning("%s: still running after shutdown: %s", self.name, ", ".join(stuck))

    # -- KV receive -------------------------------------------------------------------------
    def _receive_loop(self, ch: KVReceiver) -> None:
        # A stream of this thread's own: the channel orders its callers' streams after the
        # data it receives, and the decode steps on the default stream must not wait for a
        # transfer that is still arriving (verify() returns once every layer is in place).
        stream = (torch.cuda.Stream(self.runner.device)
                  if self.runner.device.type == "cuda" else None)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            self._receive(ch)

    def _receive(self, ch: KVReceiver) -> None:
        pool = self.runner.kv_pool
        while not self._stop:
            rid, tid = "", 0  # the request and lease the arriving transfer claims
            try:
                try:
                    header = ch.recv_header(timeout_s=2.0)
                except TransferTimeout:
                    continue  # nothing sent yet; the channel is fine
                with self._cv:
                    seq = self.sched.lease(header.transfer_id)
                    if seq is not None:
                        rid, tid = seq.request_id, seq.transfer_id
                        self._busy.add(rid)
                problem = _refusal(seq, header, self.sched.epoch, self.cfg.cache.block_size)
                if problem:
                    ch.discard()
                    log.warning("refused transfer %d: %s", header.transfer_id, problem)
                    with self._cv:
                        self._busy.discard(rid)
                        if rid and self.sched.release(rid):
                            self._failed.append((rid, tid, f"KV transfer refused: {problem}"))
                    continue
                assert seq is not None
                # The lease also holds the slot of the first generated token, which may
                # need a block of its own beyond the prompt's; the leading blocks it found
                # in the prefix cache are not sent.
                k = seq.cached_blocks
                ids = torch.tensor(seq.block_ids[k:k + header.num_blocks], dtype=torch.int64,
                                   device=pool.device)
                # Scattered into the pool as it lands; verified before the sequence runs.
                first_token = ch.recv_pool_blocks(header, pool, ids).first_token
                with self._cv:
                    self._busy.discard(rid)
                    if rid in self._pending_abort:
                        self._pending_abort.discard(rid)
                        self.sched.release(rid)
                    elif self.sched.activate(header.transfer_id, first_token):
                        self._joined.append(rid)
                    self._cv.notify()
            except TransferError as e:
                if ch.closed and (self._stop or not rid):
                    # Closed while idle: by shutdown (a waiting receive ends at once), or the
                    # prefill end left or died (the channel logged which). Nothing was lost.
                    return
                log.warning("transfer for %s failed: %s", rid or "?", e)
                with self._cv:
                    self._busy.discard(rid)
                    self._pending_abort.discard(rid)
                    if rid and self.sched.release(rid):
                        self._failed.append((rid, tid, f"KV transfer failed: {e}"))
                if ch.closed:
                    return
            except Exception:
                log.exception("channel receive loop crashed")
                return

    # -- step loop --------------------------------------------------------------------------
    def _warmup(self) -> None:
        warm_up(self.runner, self.allocator, self.cfg.max_num_seqs,
                prefill=self.cfg.local_prefill, decode=True)
        if self.runner.device.type == "cuda":
            report_late_compiles(log)

    def _run(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
                for rid in list(self._pending_abort):
                    if rid not in self._busy:
                        self._pending_abort.discard(rid)
                        self.sched.release(rid)
                for rid, tid in self.sched.expire():
                    self._failed.append((rid, tid, "KV did not arrive before the lease expired"))
                plan = self.sched.schedule()
                if self.cfg.local_prefill:  # prompt chunks share the step's token budget
                    plan.chunks = self.sched.schedule_prefill(
                        self.cfg.max_batch_tokens - len(plan.batch))
                batch = plan.batch
                joined, self._joined = self._joined, []
                failed, self._failed = self._failed, []
                broken = self._channels.take_ended()
                in_step = {s.request_id for s in batch} | {c.seq.request_id for c in plan.chunks}
                self._busy |= in_step
                if not (batch or plan.chunks or plan.preempted or failed or broken):
                    self._cv.wait(timeout=0.05)
                    continue
            # What the step runs, for the cost model (one pass over the batch and chunks).
            context = sum(s.num_tokens for s in batch)
            prompt_tokens = sum(c.length for c in plan.chunks)
            prompt_attention = attention_work((c.start, c.length) for c in plan.chunks)
            t0 = time.monotonic()
            if plan.chunks:
                tokens, firsts = self._mixed_step(batch, plan.chunks)
            else:
                tokens = decode_step(self.runner, batch) if batch else Sampled([], [])
                firsts = Sampled([], [])
            step_s = time.monotonic() - t0
            if step_s > SLOW_STEP_S:
                log.warning("slow decode step: %.3f s, batch %d, %d prompt tokens", step_s,
                            len(batch), prompt_tokens)
            with self._cv:
                outs = self.sched.postprocess(batch, tokens.tokens, tokens.logprobs)
                if plan.chunks:
                    self._first_tokens(plan.chunks, firsts, t0)
                self._busy -= in_step
                report = StepReport(
                    worker=self.name, tokens=outs, joined=joined, preempted=plan.preempted,
                    failed=failed, step_s=step_s, num_running=len(self.sched.running),
                    num_free_blocks=self.allocator.num_free, kv_usage=self.allocator.usage,
                    context_tokens=context, prefill_tokens=prompt_tokens,
                    prefill_attention=prompt_attention,
                    num_waiting=len(self.sched.reserved) + len(self.sched.ready),
                    broken_channels=broken,
                )
            self.router.on_step.remote(report)

    def _mixed_step(
        self, batch: list[DecodeSeq], chunks: list[PrefillChunk]
    ) -> tuple[Sampled, Sampled]:
        """Local prefill: one forward over the decode batch (one token each) and the prompt
        chunks, as vLLM's chunked prefill does; returns decode tokens and the first tokens
        of the sequences whose last chunk ran."""
        items = [PrefillItem([s.last_token], s.num_tokens - 1, s.block_ids) for s in batch]
        items += [PrefillItem(c.token_ids, c.start, c.seq.block_ids) for c in chunks]
        logits = self.runner.prefill(items)
        last = [len(batch) + i for i, c in enumerate(chunks) if c.is_last]
        rows = list(range(len(batch))) + last
        seqs = batch + [chunks[i - len(batch)].seq for i in last]
        steps = [s.num_generated for s in batch]
        steps += [chunks[i - len(batch)].seq.num_generated - 1 for i in last]
        out = sample_batch(logits[rows], [q.sampling for q in seqs], steps,
                           [q.history for q in seqs])
        n = len(batch)
        return (Sampled(out.tokens[:n], out.logprobs[:n]),
                Sampled(out.tokens[n:], out.logprobs[n:]))

    def _first_tokens(self, chunks: list[PrefillChunk], firsts: Sampled, t0: float) -> None:
        """Local prefill, under the lock: report first tokens; finished prompts join."""
        now = time.monotonic()
        for c in chunks:
            arrived, started = self._submitted.get(c.seq.transfer_id, (t0, 0.0))
            if not started:
                self._submitted[c.seq.transfer_id] = (arrived, t0)
        first: dict[int, tuple[int, TokenLogprobs | None]] = dict(zip(
            [c.seq.transfer_id for c in chunks if c.is_last],
            zip(firsts.tokens, firsts.logprobs, strict=True), strict=True))
        for seq in self.sched.prefilled(chunks):
            tok, lp = first[seq.transfer_id]
            arrived, started = self._submitted.pop(seq.transfer_id, (t0, t0))
            reason = self._first_token.report(
                seq.request_id, seq.transfer_id, tok, seq.sampling, seq.num_generated,
                arrived=arrived, started=started, now=now, num_tokens=seq.num_tokens - 1,
                cached_tokens=seq.cached_blocks * self.cfg.cache.block_size, logprobs=lp,
            )
            if reason is None:
                self.sched.activate(seq.transfer_id, tok)
            else:
                self.sched.release(seq.request_id)


def decode_step(runner: ModelRunner, batch: list[DecodeSeq]) -> Sampled:
    """One decode step of ``batch``: the forward pass (a CUDA graph where one fits) and the
    next token of each sequence, on the host (sampling runs outside the graph, on the
    logits it leaves)."""
    items = [DecodeItem(s.last_token, s.num_tokens - 1, s.block_ids) for s in batch]
    logits = runner.decode(items)
    return sample_batch(logits, [s.sampling for s in batch], [s.num_generated for s in batch],
                        [s.history for s in batch])


def _refusal(seq: DecodeSeq | None, header: TransferHeader, epoch: int,
             block_size: int) -> str:
    """Why the arriving transfer ``header`` is refused ('' if it matches its reservation
    ``seq``, held under this worker's ``epoch``: the prompt's blocks after those the lease
    found in the prefix cache)."""
    if seq is None:
        return "no reservation holds this transfer id (expired or aborted)"
    tokens = seq.num_tokens - 1  # the prompt's KV; the last token is the first generated
    blocks = blocks_for(tokens, block_size) - seq.cached_blocks
    try:
        match_header(header, seq.transfer_id, epoch, blocks, tokens)
    except TransferError as e:
        return str(e)
    return ""
