"""The prefill worker: a Ray actor that batches prompts, samples each request's first token
and sends the request's KV to the decode worker the router chose.

Threads: Ray's (control calls: submit, abort, connect, stats), the step loop (the model),
and the transfer thread (packs a request's blocks layer by layer and sends them over the
per-pair channel). The scheduler and allocator are touched only under ``self._cv``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import torch

from engine.config import WorkerConfig
from engine.device import describe_device
from engine.kv_cache import BlockAllocator
from engine.kv_transfer import ChannelSpec, KVChannel, TransferHeader
from engine.messages import FirstToken, PrefillTask, TransferDone, WorkerStats
from engine.runner import ModelRunner, PrefillItem
from engine.sampler import sample
from engine.sequence import finish_reason
from engine.weights import load_model_config
from prefill_worker.scheduler import PrefillScheduler, PrefillSeq

log = logging.getLogger("pdserve.prefill")


class PrefillWorker:
    """One prefill worker (hosted in a Ray actor by ``cluster.launch``)."""

    def __init__(self, name: str, cfg: WorkerConfig, router: Any) -> None:
        self.name = name
        self.cfg = cfg
        self.router = router
        self.model_config = load_model_config(cfg.model)
        self.runner = ModelRunner(self.model_config, cfg.cache, cfg.model, cfg.run)
        self.allocator = BlockAllocator(cfg.cache.num_blocks)
        self.sched = PrefillScheduler(
            self.allocator, cfg.cache.block_size, cfg.max_batch_tokens, cfg.max_num_seqs
        )
        self._cv = threading.Condition()
        self._stop = False
        self._in_step: set[str] = set()  # request ids whose blocks the running step uses
        self._orphans: list[PrefillSeq] = []  # aborted mid-step: free after the step
        self._channels: dict[str, KVChannel] = {}
        self._sends: queue.Queue[PrefillSeq | None] = queue.Queue()
        self._loop = threading.Thread(target=self._run, name="prefill-loop", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="kv-send", daemon=True)

    # -- control (Ray calls) ----------------------------------------------------------------
    def start(self) -> WorkerStats:
        """Warm the model up (first-call compilation stays out of serving), then serve."""
        self._warmup()
        self._loop.start()
        self._sender.start()
        return self.stats()

    def channel_spec(self) -> ChannelSpec:
        return ChannelSpec.from_configs(self.model_config, self.cfg.cache)

    def connect(self, decode_name: str, host: str, port: int, channel: str) -> None:
        """Join the channel ``channel`` that the decode worker hosts at host:port (rank 0)."""
        if decode_name in self._channels:
            return
        timeout = self.cfg.transfer_timeout_s
        self._channels[decode_name] = KVChannel.open(
            store=KVChannel.connect_store(host, port, timeout), name=channel, rank=0,
            spec=self.channel_spec(), device=self.runner.device, timeout_s=timeout,
            owns_store=True,
        )

    def submit(self, task: PrefillTask) -> None:
        with self._cv:
            self.sched.add(task)
            self._cv.notify()

    def abort(self, request_id: str) -> bool:
        """Drop a request that has not finished prefill; True if it was here."""
        with self._cv:
            seq = self.sched.abort(request_id)
            if seq is None:
                return False
            if request_id in self._in_step:
                self._orphans.append(seq)
            elif seq.block_ids:
                self.allocator.free(seq.block_ids)
            return True

    def stats(self) -> WorkerStats:
        with self._cv:
            return WorkerStats(
                worker=self.name, role="prefill", num_blocks=self.allocator.num_blocks,
                num_free_blocks=self.allocator.num_free, num_running=len(self.sched.active),
                num_waiting=len(self.sched.waiting), kv_usage=self.allocator.usage,
                device=describe_device(self.runner.device),
            )

    def queued_tokens(self) -> int:
        with self._cv:
            return self.sched.queued_tokens

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._sends.put(None)
        for ch in self._channels.values():
            ch.close()

    # -- step loop --------------------------------------------------------------------------
    def _warmup(self) -> None:
        ids = self.allocator.allocate(1)
        n = min(8, self.cfg.cache.block_size)
        self.runner.prefill([PrefillItem(list(range(1, n + 1)), 0, ids)])
        self.allocator.free(ids)

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
            try:
                logits = self.runner.prefill(
                    [PrefillItem(c.seq.task.token_ids[c.start:c.start + c.length], c.start,
                                 c.seq.block_ids) for c in chunks]
                )
            except Exception:
                log.exception("prefill step failed")
                raise
            last = [i for i, c in enumerate(chunks) if c.is_last]
            tokens = []
            if last:
                tasks = [chunks[i].seq.task for i in last]
                tokens = sample(
                    logits[last], [t.sampling for t in tasks], [t.num_generated for t in tasks]
                )
            now = time.monotonic()
            with self._cv:
                finished = self.sched.complete(chunks)
                self._in_step = set()
                for seq in self._orphans:
                    self.allocator.free(seq.block_ids)
                self._orphans.clear()
            by_id = {chunks[i].seq.task.request_id: tok for i, tok in zip(last, tokens,
                                                                           strict=True)}
            for seq in finished:
                task = seq.task
                tok = by_id[task.request_id]
                reason = finish_reason(task.sampling, tok, task.num_generated + 1)
                self.router.on_first_token.remote(FirstToken(
                    self.name, task.request_id, task.lease.transfer_id, tok, reason,
                    queue_s=seq.started - seq.arrived, prefill_s=now - seq.started,
                ))
                if reason is None:
                    seq.first_token = tok
                    self._sends.put(seq)
                else:
                    with self._cv:
                        self.allocator.free(seq.block_ids)

    # -- KV transfer ------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            seq = self._sends.get()
            if seq is None:
                return
            task = seq.task
            lease = task.lease
            t0 = time.monotonic()
            nbytes = 0
            error = ""
            try:
                ch = self._channels[lease.worker]
                pool = self.runner.kv_pool
                ids = torch.tensor(seq.block_ids, dtype=torch.int64, device=pool.device)
                # One staging slice per layer: a layer's buffer stays untouched until
                # finish() because sends are asynchronous.
                staging = torch.empty((pool.shape[0], 2, len(seq.block_ids), *pool.shape[3:]),
                                      dtype=pool.dtype, device=pool.device)
                header = TransferHeader.for_spec(
                    ch.spec, transfer_id=lease.transfer_id, epoch=lease.epoch,
                    num_blocks=len(seq.block_ids), num_tokens=len(task.token_ids),
                    first_token=seq.first_token,
                )
                ch.send_header(header)
                for layer in range(pool.shape[0]):
                    self.runner.model.ops.pack_kv(pool[layer], ids, staging[layer])
                    ch.send_layer(staging[layer])
                ch.finish()
                nbytes = header.bytes_per_layer * header.num_layers
            except Exception as e:  # a failed transfer is the router's to re-route
                log.exception("KV transfer of %s failed", task.request_id)
                error = f"{type(e).__name__}: {e}"
            finally:
                with self._cv:
                    self.allocator.free(seq.block_ids)
            self.router.on_transfer_done.remote(TransferDone(
                self.name, task.request_id, ok=not error, seconds=time.monotonic() - t0,
                nbytes=nbytes, error=error,
            ))

