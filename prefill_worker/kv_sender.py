"""One request's KV on its way out: header, messages of packed layers, trailer.

Used two ways by the prefill worker: layer-wise during the forward pass (one layer per
message: layer l leaves while layer l+1 computes; on GPU the channel packs and sends on its
own stream), or in one go from the send thread when the request's channel was busy with
another transfer (a few large messages of several layers each).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from pdserve.engine.kv import Departure, KVSender, TransferHeader, layers_per_message
from pdserve.engine.messages import TransferDone
from pdserve.prefill_worker.scheduler import PrefillSeq


class OutgoingKV:
    """Streams ``seq``'s blocks from ``pool`` [L, 2, N, bs, Hk, D] over ``channel``:
    ``layerwise`` one layer per message as the forward pass produces them, else in messages
    of about :data:`kernels.kv_pack.MESSAGE_BYTES`.

    The caller holds ``lock`` (the channel's: one transfer being sent at a time per
    channel) from :meth:`start` until :meth:`finish` or :meth:`cancel` returns. A transfer
    finished with ``wait=False`` departs without it: the next one may start while it leaves.
    """

    def __init__(self, seq: PrefillSeq, channel: KVSender, lock: threading.Lock,
                 pool: torch.Tensor, layerwise: bool) -> None:
        self.seq = seq
        self.channel = channel
        self.lock = lock
        self.pool = pool
        self.ids = torch.tensor(seq.block_ids, dtype=torch.int64, device=pool.device)
        lease = seq.task.lease
        spec = channel.spec
        per_message = 1 if layerwise else layers_per_message(
            spec.layer_bytes(len(seq.block_ids)), spec.num_layers)
        self.header = TransferHeader.for_spec(
            spec, transfer_id=lease.transfer_id, epoch=lease.epoch,
            num_blocks=len(seq.block_ids), num_tokens=len(seq.task.token_ids),
            layers_per_message=per_message,
        )
        self.started = 0.0
        self.departure: Departure | None = None  # once the trailer is posted
        self.error = ""  # set when a layer failed to go out; the rest is then skipped

    @property
    def nbytes(self) -> int:
        return self.header.payload_bytes

    def start(self) -> None:
        self.started = time.monotonic()
        self.channel.send_header(self.header)

    def send_layer(self, layer: int) -> None:
        """Layer-wise: ``layer`` of the pool, packed and sent on the channel's stream after
        the work queued so far (the layer's forward pass)."""
        self.channel.send_from_pool(self.pool[layer:layer + 1], self.ids)

    def send_layer_safely(self, layer: int) -> None:
        """For the forward pass's layer hook: a failing transfer must not fail the step
        (other requests share it); the error is kept and reported at finish time."""
        if self.error:
            return
        try:
            self.send_layer(layer)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"

    def send_all_layers(self) -> None:
        """Every message of a complete request's KV."""
        h = self.header
        for m in range(h.num_messages):
            layers = h.message_layers(m)
            self.channel.send_from_pool(self.pool[layers.start:layers.stop], self.ids)

    def finish(self, first_token: int, wait: bool = True) -> float:
        """Trailer (with the first token) out, and unless ``wait=False`` wait until all left
        (then :meth:`wait_finished`); returns seconds so far."""
        if self.error:
            raise RuntimeError(f"a layer failed to go out: {self.error}")
        self.departure = self.channel.finish(first_token, wait=wait)
        return time.monotonic() - self.started

    def wait_finished(self) -> float:
        """After ``finish(wait=False)``: wait until all left; returns the transfer's seconds."""
        if self.departure is None:
            raise RuntimeError("wait_finished() before finish()")
        self.channel.wait_finished(self.departure)
        return time.monotonic() - self.started

    def cancel(self) -> None:
        if not self.channel.closed:
            self.channel.cancel()



class SenderChannels:
    """The prefill worker's KV channels by decode worker, each with the lock that lets one
    transfer at a time onto it. Thread-safe."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._by_peer: dict[str, tuple[KVSender, threading.Lock]] = {}

    def __contains__(self, peer: str) -> bool:
        return peer in self._by_peer

    def add(self, peer: str, channel: KVSender) -> None:
        with self._mu:
            self._by_peer[peer] = (channel, threading.Lock())

    def get(self, peer: str) -> tuple[KVSender, threading.Lock] | None:
        """``peer``'s channel and lock; None once it is closed (that worker left)."""
        with self._mu:
            return self._by_peer.get(peer)

    def all(self) -> list[KVSender]:
        with self._mu:
            return [ch for ch, _ in self._by_peer.values()]

    def close(self, peer: str, timeout_s: float) -> bool:
        """Forget ``peer``'s channel and close it once the transfer on it (if any) is out,
        waiting at most ``timeout_s``; its goodbye tells the decode end this end left."""
        with self._mu:
            entry = self._by_peer.pop(peer, None)
        if entry is None:
            return False
        channel, lock = entry
        got = lock.acquire(timeout=timeout_s)
        try:
            channel.close(abort=True)
        finally:
            if got:
                lock.release()
        return True


class TransferReporter:
    """Tells the router (``send``: its ``on_transfer_done`` call) how a request's transfer
    went: its seconds and bytes, or the error that ended it."""

    def __init__(self, worker: str, send: Callable[[TransferDone], object]) -> None:
        self.worker = worker
        self._send = send

    def __call__(self, seq: PrefillSeq, seconds: float, nbytes: int, error: str) -> None:
        self._send(TransferDone(
            self.worker, seq.task.request_id, seq.task.lease.transfer_id, ok=not error,
            seconds=seconds, nbytes=nbytes, error=error,
        ))
