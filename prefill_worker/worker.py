"""The prefill worker: a Ray actor that batches prompts, samples each request's first token
and sends the request's KV to the decode worker the router chose.

Threads: Ray's (control calls: submit, abort, connect, stats), the step loop (the model; it
sends a request's KV layer by layer during the forward pass when the request's channel is
free), the send thread (whole transfers that could not stream), and the finisher (waits
until each departing transfer left, then frees its blocks and reports). The scheduler and
allocator are touched only under ``self._cv``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from pdserve.engine.chunking import attention_work
from pdserve.engine.config import WorkerConfig
from pdserve.engine.device import describe_device
from pdserve.engine.first_token import FirstTokenReporter
from pdserve.engine.kv import ChannelSpec, connect_store, open_sender
from pdserve.engine.messages import PrefillTask, StepTiming, WorkerStats
from pdserve.engine.runner import PrefillItem
from pdserve.engine.sampler import Sampled, sample_batch
from pdserve.engine.teardown import SHUTDOWN_GRACE_S, abort_channels, join_threads
from pdserve.engine.warmup import SLOW_STEP_S, report_late_compiles, start_runner, warm_up
from pdserve.prefill_worker.kv_sender import OutgoingKV, SenderChannels, TransferReporter
from pdserve.prefill_worker.scheduler import Chunk, PrefillScheduler, PrefillSeq

log = logging.getLogger("pdserve.prefill")


class PrefillWorker:
    """One prefill worker (hosted in a Ray actor by ``cluster.launch``)."""

    def __init__(self, name: str, cfg: WorkerConfig, router: Any) -> None:
        self.name = name
        self.cfg = cfg
        self.router = router
        self._first_token = FirstTokenReporter(name, router.on_first_token.remote)
        self._report_transfer = TransferReporter(name, router.on_transfer_done.remote)
        self.model_config, self.runner, self.allocator = start_runner(cfg)
        self.sched = PrefillScheduler(
            self.allocator, cfg.cache.block_size, cfg.max_batch_tokens, cfg.max_num_seqs,
            salt=self.runner.fingerprint)
        self._cv = threading.Condition()
        self._stop = False
        self._in_step: set[str] = set()  # request ids whose blocks the running step uses
        self._orphans: list[PrefillSeq] = []  # aborted mid-step: free after the step
        self._channels = SenderChannels()
        self._sends: queue.Queue[PrefillSeq | None] = queue.Queue()
        # Transfers whose trailer is out, waiting to have left: the step loop and the send
        # thread move on (the next transfer may start) instead of waiting on the decode side.
        self._finishing: queue.Queue[OutgoingKV | None] = queue.Queue()
        self._loop = threading.Thread(target=self._run, name="prefill-loop", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="kv-send", daemon=True)
        self._finisher = threading.Thread(target=self._finish_loop, name="kv-finish",
                                          daemon=True)

    # -- control (Ray calls) ----------------------------------------------------------------
    def start(self) -> WorkerStats:
        """Warm the model up (first-call compilation stays out of serving), then serve."""
        self._warmup()
        self._loop.start()
        self._sender.start()
        self._finisher.start()
        return self.stats()

    def channel_spec(self) -> ChannelSpec:
        return ChannelSpec.from_configs(self.model_config, self.cfg.cache,
                                        self.runner.fingerprint)

    def connect(self, decode_name: str, host: str, port: int, channel: str) -> None:
        """Join the channel ``channel`` that the decode worker hosts at host:port (rank 0), in
        place of a broken one to that worker (whose name differs; the same name: a no-op)."""
        if self._channels.name(decode_name) == channel:
            return
        timeout = self.cfg.transfer_timeout_s
        ch = open_sender(
            store=connect_store(host, port, timeout), name=channel, secret=self.cfg.secret,
            spec=self.channel_spec(),
            device=self.runner.device, timeout_s=timeout, gloo_host=self.cfg.host,
            owns_store=True,
        )
        with self._cv:  # shutdown() aborts the channels it finds here; a later one, we do
            if not self._stop:
                self._channels.add(decode_name, ch)
                return
        ch.close(abort=True)

    def disconnect(self, decode_name: str) -> bool:
        """Close the channel to ``decode_name`` (that worker drains away); True if there was
        one. A transfer still on it finishes first, for up to the transfer timeout."""
        return self._channels.close(decode_name, self.cfg.transfer_timeout_s)

    def channels(self) -> dict[str, tuple[str, bool]]:
        """Each KV channel's name and whether it is open, by decode worker."""
        return self._channels.names()

    def submit(self, task: PrefillTask) -> None:
        with self._cv:
            self.sched.add(task)
            self._cv.notify()

    def abort(self, request_id: str, transfer_id: int | None = None) -> bool:
        """Drop a request that has not finished prefill; True if it was here. With
        ``transfer_id``, only that attempt: an abort of an old attempt that arrives after
        the request's next one (Ray runs a threaded actor's calls concurrently) must not
        drop the new one."""
        with self._cv:
            seq = self.sched.abort(request_id, transfer_id)
            if seq is None:
                return False
            if request_id in self._in_step:
                self._orphans.append(seq)
            elif seq.block_ids:
                self.allocator.free(seq.block_ids)
            return True

    def stats(self) -> WorkerStats:
        with self._cv:
            return self.sched.stats(self.name, describe_device(self.runner.device))

    def shutdown(self) -> None:
        """Stop the threads and abort the KV channels; returns within about
        ``SHUTDOWN_GRACE_S`` whatever the decode workers do (see ``engine.teardown``).

        The step loop finishes its step; then the channels are aborted, which also ends a
        transfer still waiting on its decode worker, and the transfer threads get what is left
        of the grace period. Queued transfers are dropped (the router aborted every request).
        No channel lock is taken here: a transfer holds its channel's lock while it blocks."""
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        with self._cv:
            self._stop = True
            self._cv.notify_all()
            channels = self._channels.all()
        self._sends.put(None)
        self._finishing.put(None)
        stuck = join_threads([self._loop], deadline)
        stuck += abort_channels(channels, deadline)
        stuck += join_threads([self._sender, self._finisher], deadline)
        if stuck:
            log.warning("%s: still running after shutdown: %s", self.name, ", ".join(stuck))

    # -- step loop --------------------------------------------------------------------------
    def _warmup(self) -> None:
        warm_up(self.runner, self.allocator, self.cfg.max_num_seqs, prefill=True, decode=False)
        if self.runner.device.type == "cuda":
            report_late_compiles(log)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not (self.sched.waiting or self.sched.active):
                    self._cv.wait()
                if self._stop:
                    return
                chunks = self.sched.schedule()
                self._in_step = {c.seq.task.request_id for c in chunks}
            if not chunks:  # waiting for blocks held by in-flight transfers
                time.sleep(0.002)
                continue
            t_step = time.monotonic()
            streams = self._open_streams([c.seq for c in chunks if c.is_last])
            try:
                logits = self.runner.prefill(
                    [PrefillItem(c.seq.task.token_ids[c.start:c.start + c.length], c.start,
                                 c.seq.block_ids) for c in chunks],
                    on_layer_done=layer_sender(list(streams.values())),
                )
            except Exception as e:  # keep serving: this step's requests go back to the router
                log.exception("prefill step failed")
                for out in streams.values():
                    self._close_stream(out, None, "prefill step failed")
                self._fail_step(chunks, f"prefill step failed: {type(e).__name__}: {e}",
                                {id(out.seq) for out in streams.values()})
                continue
            last = [i for i, c in enumerate(chunks) if c.is_last]
            sampled = sample_first(logits, [chunks[i].seq.task for i in last], last)
            if not last:  # sampling reads nothing back: wait for the GPU here, so it is timed
                self.runner.synchronize()
            now = time.monotonic()
            timing = StepTiming(sum(c.length for c in chunks),
                                attention_work((c.start, c.length) for c in chunks), now - t_step)
            if timing.seconds > SLOW_STEP_S:
                log.warning("slow prefill step: %.3f s, %d chunks, %d tokens", timing.seconds,
                            len(chunks), timing.tokens)
            with self._cv:
                finished = self.sched.complete(chunks)
                self._free_orphans({id(out.seq) for out in streams.values()})
            by_id = {chunks[i].seq.task.request_id: (tok, lp) for i, tok, lp in zip(
                last, sampled.tokens, sampled.logprobs, strict=True)}
            step: StepTiming | None = timing
            for seq in finished:
                task = seq.task
                tok, lp = by_id[task.request_id]
                reason = self._first_token.report(
                    task.request_id, task.lease.transfer_id, tok, task.sampling,
                    task.num_generated + 1, arrived=seq.arrived, started=seq.started, now=now,
                    step=step, num_tokens=len(task.token_ids), cached_tokens=seq.cached_tokens,
                    logprobs=lp,
                )
                step = None  # the step is reported once, with its first finished prompt
                seq.first_token = tok
                stream = streams.get(task.request_id)
                if stream is not None:
                    del streams[task.request_id]
                    self._close_stream(stream, tok if reason is None else None, "")
                elif reason is None:
                    self._sends.put(seq)
                else:
                    with self._cv:
                        self.allocator.free(seq.block_ids)
            for out in streams.values():  # aborted during the step
                self._close_stream(out, None, "aborted")

    def _fail_step(self, chunks: list[Chunk], error: str, streamed: set[int]) -> None:
        """Drop every request of a failed step and tell the router (which re-dispatches).
        ``streamed``: the ids of the sequences whose cancelled stream freed their blocks."""
        with self._cv:
            for c in chunks:
                if self.sched.abort(c.seq.task.request_id) is not None \
                        and id(c.seq) not in streamed:
                    self.allocator.free(c.seq.block_ids)
            self._free_orphans(streamed)
        for c in chunks:
            self._report_transfer(c.seq, 0.0, 0, error)

    def _free_orphans(self, streamed: set[int]) -> None:
        """Under the lock, after a step: free the blocks of the requests aborted during it,
        but for those (ids in ``streamed``) whose open stream frees them as it is cancelled."""
        self._in_step = set()
        for seq in self._orphans:
            if id(seq) not in streamed:
                self.allocator.free(seq.block_ids)
        self._orphans.clear()

    # -- KV transfer ------------------------------------------------------------------------
    def _open_streams(self, seqs: list[PrefillSeq]) -> dict[str, OutgoingKV]:
        """Start layer-wise transfers for sequences whose prompt completes in this step, one
        per channel that is free right now (the others go to the send thread after)."""
        if not self.cfg.layerwise_transfer:
            return {}
        streams: dict[str, OutgoingKV] = {}
        for seq in seqs:
            lease = seq.task.lease
            entry = self._channels.get(lease.worker)
            if entry is None or not entry[1].acquire(blocking=False):
                continue
            ch, lock = entry
            out = OutgoingKV(seq, ch, lock, self.runner.kv_pool, layerwise=True)
            try:
                out.start()
            except Exception as e:
                log.exception("KV transfer of %s failed to start", seq.task.request_id)
                lock.release()
                self._report_transfer(seq, 0.0, 0, f"{type(e).__name__}: {e}", ch)
                continue
            streams[seq.task.request_id] = out
        return streams

    def _close_stream(self, out: OutgoingKV, first_token: int | None, why: str) -> None:
        """Finish a layer-wise transfer with the first token (the trailer goes out now and
        the channel is free for the next transfer; the finisher thread waits for this one
        to leave, then frees the blocks and reports), or cancel it (here, freeing its
        blocks)."""
        error = why
        try:
            if first_token is None:
                out.cancel()
            else:
                out.finish(first_token, wait=False)
                self._finishing.put(out)
                return
        except Exception as e:  # e.g. a layer failed to go out: the transfer is void
            error = f"{type(e).__name__}: {e}"
            if first_token is not None:
                with contextlib.suppress(Exception):
                    out.cancel()
        finally:
            out.lock.release()
        self._end_stream(out, 0.0, error, report=first_token is not None)

    def _finish_loop(self) -> None:
        while True:
            out = self._finishing.get()
            if out is None or self._stop:  # stopping: the decode side no longer receives
                return
            seconds, error = 0.0, ""
            try:
                seconds = out.wait_finished()
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            self._end_stream(out, seconds, error, report=True)

    def _end_stream(self, out: OutgoingKV, seconds: float, error: str, report: bool) -> None:
        """Free a transfer's blocks once it left or failed (and report it)."""
        if error and report:
            log.error("KV transfer of %s failed: %s", out.seq.task.request_id, error)
        with self._cv:
            self.allocator.free(out.seq.block_ids)
        if report:
            self._report_transfer(out.seq, seconds, out.nbytes if not error else 0, error,
                                  out.channel)

    def _send_loop(self) -> None:
        """Transfers that could not stream during their step, one whole request at a time.
        Each one departs once its trailer is posted: the next one starts while it leaves
        (queued behind it on the channel), and the finisher thread waits for it."""
        while True:
            seq = self._sends.get()
            if seq is None or self._stop:  # stopping: start no transfer (it would wait)
                return
            worker = seq.task.lease.worker
            entry = self._channels.get(worker)
            if entry is None:  # disconnected since: that decode worker left
                with self._cv:
                    self.allocator.free(seq.block_ids)
                self._report_transfer(seq, 0.0, 0, f"no KV channel to {worker}")
                continue
            ch, lock = entry
            with lock:
                out = OutgoingKV(seq, ch, lock, self.runner.kv_pool, layerwise=False)
                error = out.send_whole()
            if error:  # a failed transfer is the router's to re-route
                self._end_stream(out, 0.0, error, report=True)
            else:
                self._finishing.put(out)


def sample_first(logits: torch.Tensor, tasks: list[PrefillTask], rows: list[int]) -> Sampled:
    """The first tokens of ``tasks``, whose last chunks' logits are ``logits[rows]``; a
    task's token_ids (prompt and the tokens generated before this attempt) are what its
    penalties count."""
    if not rows:
        return Sampled([], [])
    return sample_batch(logits[rows], [t.sampling for t in tasks],
                        [t.num_generated for t in tasks], [t.token_ids for t in tasks])


def layer_sender(streams: list[OutgoingKV]) -> Callable[[int], None] | None:
    """The forward pass's layer hook: each layer's KV out on every open stream."""
    if not streams:
        return None

    def on_layer_done(layer: int) -> None:
        for out in streams:
            out.send_layer_safely(layer)

    return on_layer_done
