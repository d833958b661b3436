"""A simulated prefill worker: ``prefill_worker.worker.PrefillWorker`` with the forward pass
and the KV channel replaced by simulated time.

It holds the real :class:`~pdserve.prefill_worker.scheduler.PrefillScheduler` over a real
block allocator and drives it as the real step loop does: ``schedule`` (token-budget
batching, chunked prefill, blocks held from admission until the KV left), a step of
:class:`~pdserve.cluster.tune.steps.StepTimes`' length, ``complete``, a ``FirstToken`` per
finished prompt (the step's timing on the first), then the KV transfer and its
``TransferDone``.

A transfer runs on its (prefill, decode) channel, one at a time on the wire: a prompt
whose last chunk starts on a free channel streams during its step (layer-wise, as the real
worker sends layer l while layer l+1 computes) and is done at the later of the step's end
and its own transfer time after the start; any other waits for the channel and then takes
its whole transfer time. The reported seconds run from the transfer's start, as the real
sender measures them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pdserve.cluster.tune.decode import SimDecodeWorker
from pdserve.cluster.tune.steps import DUMMY_TOKEN, StepTimes
from pdserve.engine.chunking import attention_work
from pdserve.engine.config import WorkerConfig
from pdserve.engine.first_token import FirstTokenReporter
from pdserve.engine.kv_cache import BlockAllocator
from pdserve.engine.messages import PrefillTask, StepTiming, TransferDone, WorkerStats
from pdserve.prefill_worker.scheduler import Chunk, PrefillScheduler, PrefillSeq


@dataclass
class _Channel:
    """One (prefill, decode) KV channel: its receiver and when its wire is free again."""

    decode: SimDecodeWorker
    free_at: float = 0.0


class SimPrefillWorker:
    """One prefill worker on simulated time."""

    def __init__(self, name: str, cfg: WorkerConfig, times: StepTimes, router: Any,
                 loop: asyncio.AbstractEventLoop, decode: Mapping[str, SimDecodeWorker]) -> None:
        self.name = name
        self.cfg = cfg
        self.times = times
        self.router = router
        self.loop = loop
        self._decode = decode  # the deployment's decode workers, for connect
        self._first_token = FirstTokenReporter(name, router.on_first_token.remote)
        self.allocator = BlockAllocator(cfg.cache.num_blocks)
        self.sched = PrefillScheduler(self.allocator, cfg.cache.block_size,
                                      cfg.max_batch_tokens, cfg.max_num_seqs, clock=loop.time)
        self._channels: dict[str, _Channel] = {}
        self._in_step: set[str] = set()
        self._orphans: list[PrefillSeq] = []  # aborted mid-step: freed after the step
        self._stepping = False
        self._kicked = False
        self.steps = 0

    # -- control (the router's calls) -------------------------------------------------------
    def connect(self, decode_name: str, host: str, port: int, channel: str) -> None:
        if decode_name not in self._channels:
            self._channels[decode_name] = _Channel(self._decode[decode_name])

    def submit(self, task: PrefillTask) -> None:
        self.sched.add(task)
        self._kick()

    def abort(self, request_id: str, transfer_id: int | None = None) -> bool:
        seq = self.sched.abort(request_id, transfer_id)
        if seq is None:
            return False
        if request_id in self._in_step:
            self._orphans.append(seq)
        elif seq.block_ids:
            self.allocator.free(seq.block_ids)
            self._kick()  # the queue may wait for those blocks (the real loop polls)
        return True

    def stats(self) -> WorkerStats:
        return self.sched.stats(self.name, "simulated")

    # -- step loop --------------------------------------------------------------------------
    def _kick(self) -> None:
        if not self._stepping and not self._kicked:
            self._kicked = True
            self.loop.call_soon(self._step)

    def _step(self) -> None:
        self._kicked = False
        if not (self.sched.waiting or self.sched.active):
            return  # idle until a submit
        chunks = self.sched.schedule()
        if not chunks:
            return  # waiting for blocks held by transfers: the next one to end kicks
        self._in_step = {c.seq.task.request_id for c in chunks}
        now = self.loop.time()
        streams: dict[str, PrefillSeq] = {}
        if self.cfg.layerwise_transfer:
            for c in chunks:
                ch = self._channels[c.seq.task.lease.worker]
                if c.is_last and ch.free_at <= now:
                    ch.free_at = float("inf")  # streaming: held until its done time is known
                    ch.decode.receive_begin(c.seq.task.lease.transfer_id)
                    streams[c.seq.task.request_id] = c.seq
        tokens = sum(c.length for c in chunks)
        attention = attention_work((c.start, c.length) for c in chunks)
        self._stepping = True
        self.loop.call_later(self.times.prefill_step_s(tokens, attention), self._end_step,
                             chunks, streams, StepTiming(tokens, attention, 0.0), now)

    def _end_step(self, chunks: list[Chunk], streams: dict[str, PrefillSeq],
                  work: StepTiming, t0: float) -> None:
        self._stepping = False
        self.steps += 1
        now = self.loop.time()
        finished = self.sched.complete(chunks)
        self._in_step = set()
        for seq in self._orphans:
            self.allocator.free(seq.block_ids)
        self._orphans.clear()
        step: StepTiming | None = StepTiming(work.tokens, work.attention, now - t0)
        sends: list[tuple[PrefillSeq, bool]] = []
        for seq in finished:
            task = seq.task
            reason = self._first_token.report(
                task.request_id, task.lease.transfer_id, DUMMY_TOKEN, task.sampling,
                task.num_generated + 1, arrived=seq.arrived, started=seq.started, now=now,
                step=step)
            step = None  # the step is reported once, with its first finished prompt
            seq.first_token = DUMMY_TOKEN
            streamed = streams.pop(task.request_id, None) is not None
            if reason is None:
                sends.append((seq, streamed))
                continue
            if streamed:  # the first token ended the request: nothing to send
                self._cancel(seq)
            self.allocator.free(seq.block_ids)
        for seq in streams.values():  # aborted during the step: its blocks were freed above
            self._cancel(seq)
        # The streams first: they hold their channels, and a whole transfer queues behind.
        for seq, streamed in sorted(sends, key=lambda s: not s[1]):
            self._send(seq, t0 if streamed else None)
        self._step()  # the loop goes straight on to the next step

    # -- KV transfer ------------------------------------------------------------------------
    def _send(self, seq: PrefillSeq, streamed_from: float | None) -> None:
        """Transfer ``seq``'s KV: streamed since ``streamed_from``, or whole once its channel
        is free."""
        ch = self._channels[seq.task.lease.worker]
        nbytes = self.times.transfer_bytes(len(seq.task.token_ids))
        now = self.loop.time()
        if streamed_from is not None:
            start = streamed_from
            done = max(now, start + self.times.transfer_s(nbytes))
        else:
            start = max(now, ch.free_at)
            done = start + self.times.transfer_s(nbytes)
            if start > now:
                self.loop.call_at(start, ch.decode.receive_begin, seq.task.lease.transfer_id)
            else:
                ch.decode.receive_begin(seq.task.lease.transfer_id)
        ch.free_at = done
        self.loop.call_at(done, self._sent, seq, start, nbytes)

    def _sent(self, seq: PrefillSeq, start: float, nbytes: int) -> None:
        ch = self._channels[seq.task.lease.worker]
        ch.decode.receive_end(seq.task.lease.transfer_id, seq.first_token)
        self.allocator.free(seq.block_ids)
        self.router.on_transfer_done.remote(TransferDone(
            self.name, seq.task.request_id, seq.task.lease.transfer_id, ok=True,
            seconds=self.loop.time() - start, nbytes=nbytes))
        self._kick()  # its blocks may be what the queue waits for

    def _cancel(self, seq: PrefillSeq) -> None:
        """End a stream that will not finish: the channel is free, the receiver drops it."""
        ch = self._channels[seq.task.lease.worker]
        ch.free_at = self.loop.time()
        ch.decode.receive_end(seq.task.lease.transfer_id, None)
