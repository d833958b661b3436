"""One request's KV on its way out: header, messages of packed layers, trailer.

Used two ways by the prefill worker: layer-wise during the forward pass (one layer per
message: layer l leaves while layer l+1 computes; on GPU the channel packs and sends on its
own stream), or in one go from the send thread when the request's channel was busy with
another transfer (a few large messages of several layers each).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import torch

from pdserve.engine.kv import Departure, KVSender, TransferHeader, layers_per_message
from pdserve.engine.messages import TransferDone
from pdserve.prefill_worker.scheduler import PrefillSeq

log = logging.getLogger("pdserve.prefill")


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
        # Only the blocks after those the decode worker holds already (its prefix cache).
        sent = seq.sent_blocks
        self.ids = torch.tensor(sent, dtype=torch.int64, device=pool.device)
        lease = seq.task.lease
        spec = channel.spec
        per_message = 1 if layerwise else layers_per_message(
            spec.layer_bytes(len(sent)), spec.num_layers)
        self.header = TransferHeader.for_spec(
            spec, transfer_id=lease.transfer_id, epoch=lease.epoch,
            num_blocks=len(sent), num_tokens=len(seq.task.token_ids),
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

    def send_whole(self) -> str:
        """Header, every message and the trailer of a complete request's KV (it departs;
        :meth:`wait_finished` follows); '' or the error that ended it, the transfer then
        cancelled."""
        try:
            self.start()
            self.send_all_layers()
            self.finish(self.seq.first_token, wait=False)
        except Exception as e:
            log.exception("KV transfer of %s failed", self.seq.task.request_id)
            with contextlib.suppress(Exception):  # a broken channel has nothing to cancel
                self.cancel()
            return f"{type(e).__name__}: {e}"
        return ""

    def cancel(self) -> None:
        if not self.channel.closed:
            self.channel.cancel()



class SenderChannels:
    """The prefill worker's KV channels by decode worker, each with the lock that lets one
    transfer at a time onto it. Thread-safe.

    A channel the router found broken is replaced by a fresh one under a new name
    (:meth:`add`): the old one is closed, and a transfer still on it fails and is reported
    as a transfer on a broken channel (``TransferDone.broken_channel``)."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._by_peer: dict[str, tuple[KVSender, threading.Lock]] = {}

    def __contains__(self, peer: str) -> bool:
        return peer in self._by_peer

    def name(self, peer: str) -> str | None:
        """The name of ``peer``'s channel, if there is one."""
        entry = self._by_peer.get(peer)
        return entry[0].name if entry is not None else None

    def names(self) -> dict[str, tuple[str, bool]]:
        """Every channel's name and whether it is still open, by decode worker."""
        with self._mu:
            return {peer: (ch.name, not ch.closed) for peer, (ch, _) in self._by_peer.items()}

    def add(self, peer: str, channel: KVSender) -> None:
        """``channel`` is ``peer``'s from now on; the one it replaces, if any, is closed
        (without waiting for a transfer on it: the router reopens a channel it found
        broken)."""
        with self._mu:
            old = self._by_peer.get(peer)
            self._by_peer[peer] = (channel, threading.Lock())
        if old is not None and old[0] is not channel:
            old[0].close(abort=True)

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
    went: its seconds and bytes, or the error that ended it, naming the channel when that
    channel is closed (it broke, or was closed under the transfer)."""

    def __init__(self, worker: str, send: Callable[[TransferDone], object]) -> None:
        self.worker = worker
        self._send = send

    def __call__(self, seq: PrefillSeq, seconds: float, nbytes: int, error: str,
                 channel: KVSender | None = None) -> None:
        broken = channel.name if error and channel is not None and channel.closed else ""
        self._send(TransferDone(
            self.worker, seq.task.request_id, seq.task.lease.transfer_id, ok=not error,
            seconds=seconds, nbytes=nbytes, error=error, broken_channel=broken,
        ))
