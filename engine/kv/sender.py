"""The prefill end of a KV channel (:mod:`engine.kv`): :class:`KVSender`.

Staying in sync: after the header went out, a bad layer tensor, an extra layer,
:meth:`KVSender.finish` before the last layer or a failing layer source *cancel* the transfer:
the remaining layers go out as zeros and the trailer says "cancelled", which the receiver
reports as a :class:`TransferError`.

Pipelined sending: once :meth:`KVSender.finish` posted a transfer's trailer (``wait=False``),
the next transfer may start at once; its sends queue behind the departing one's on the same
NCCL stream, so transfers back to back keep the link busy.

Thread safety: a sender is used by one thread at a time, except that
:meth:`KVSender.wait_finished` for a departing transfer may run on another thread while the
next one is being sent, and :meth:`KVSender.close` may come from another thread (shutdown).

On NCCL, layer sends are only queued (no host round trip between layers); the sender blocks
in :meth:`KVSender.finish`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pdserve.engine.kv.channel import ChannelEnd, Link, Pending, TransferStats, first_word
from pdserve.engine.kv.doorbell import DoorbellError
from pdserve.engine.kv.protocol import (
    STATUS_CANCELLED,
    STATUS_OK,
    TAG_LAYER0,
    TAG_TRAILER,
    TRAILER_CHECKSUM,
    TRAILER_SLOTS,
    ChannelError,
    ChannelSpec,
    TransferHeader,
    checksum_tensor,
    message_name,
    write_trailer,
)
from pdserve.kernels import kv_pack

logger = logging.getLogger(__name__)

# The sender's trailers are built in a ring of this many buffers (pinned host memory and
# device memory): one is reused only once the trailer it last carried has left, which with
# transfers in flight back to back is long since.
TRAILER_RING = 8


@dataclass(eq=False)
class Departure:
    """A transfer on the sending end: being sent, then (once :meth:`KVSender.finish` posted
    its trailer) departing until everything it queued has left. ``finish`` returns it; with
    ``wait=False``, :meth:`KVSender.wait_finished` takes it."""

    header: TransferHeader
    started: float
    next_msg: int = 0
    pending: list[Pending] = field(default_factory=list)
    finished: bool = False  # every queued send completed (and was accounted for)


class KVSender:
    """The prefill end of a per-pair KV channel (rank 0): it sends transfers.

    Straight from the KV pool (the channel packs and checksums in one pass)::

        h = TransferHeader.for_spec(spec, transfer_id=..., epoch=..., num_blocks=...,
                                    num_tokens=..., layers_per_message=k)
        tx.send_header(h)
        for m in range(h.num_messages):      # layer-wise streaming: k = 1, one per layer
            layers = h.message_layers(m)
            tx.send_from_pool(pool[layers.start:layers.stop], block_ids)  # returns at once
        tx.finish(first_token)  # sends the trailer, waits until everything left (or raises)

    (:meth:`send_message` sends caller-packed ``[k_m, 2, n, bs, Hk, D]`` tensors instead.)
    Open one with :func:`engine.kv.connect.open_sender`.
    """

    def __init__(self, link: Link) -> None:
        self._end = ChannelEnd(link, in_flight=lambda: self.busy, forget=self._forget)
        self.name = link.name
        self.spec: ChannelSpec = link.spec
        self.device = device = link.device
        self._tx: Departure | None = None  # being sent (header out, trailer not yet)
        self._leaving: list[Departure] = []  # trailer posted, not yet seen to have left
        # Guards what a thread in wait_finished() shares with the thread sending the next
        # transfer: _leaving and the stats.
        self._state_lock = threading.Lock()
        # The running checksum (0-d int64), which every message's pack adds to; the trailer
        # takes it and zeroes it behind itself (stream order), ready for the next.
        with self._end.on_stream():
            self._send_sum = torch.zeros((), dtype=torch.int64, device=device)
        # The trailer ring (see TRAILER_RING). Its words are written on the host (through a
        # NumPy view) and copied to the device behind the transfer's packs, then the
        # checksum word is taken from the running checksum: no host sync, no allocation.
        is_cuda = self._end.is_cuda
        self._trailer_host = torch.zeros((TRAILER_RING, TRAILER_SLOTS), dtype=torch.int64,
                                         pin_memory=is_cuda)
        self._trailer_np = self._trailer_host.numpy()
        self._trailer_dev = (torch.zeros_like(self._trailer_host, device=device)
                             if is_cuda else self._trailer_host)
        self._trailer_work: list[Pending | None] = [None] * TRAILER_RING
        self._trailer_next = 0
        # Test hook: (message, tensor) -> tensor actually sent, applied after the checksum.
        self._send_hook: Callable[[int, Tensor], Tensor] | None = None
        self.stats = TransferStats()  # of the transfers that left

    @property
    def closed(self) -> bool:
        return self._end.closed

    @property
    def busy(self) -> bool:
        """A transfer is being sent or has not left yet."""
        return self._tx is not None or bool(self._leaving)

    @property
    def current(self) -> TransferHeader | None:
        """The header of the transfer being sent (header out, trailer not yet), if any."""
        return self._tx.header if self._tx is not None else None

    def set_staging_slots(self, n: int) -> None:
        """Use ``n`` (at least 2) staging buffers in turn: packing runs up to ``n - 1``
        messages ahead of the send that frees a buffer. Only between transfers."""
        self._end.set_staging_slots(n, self.busy)

    def close(self, abort: bool = False) -> None:
        """See :meth:`ChannelEnd.close`; a transfer still departing is aborted."""
        self._end.close(abort)

    def send_header(self, header: TransferHeader) -> None:
        """Start a transfer: ring the doorbell with the header. A receiver that left or died
        while this end was idle is seen first (:class:`ChannelClosed`, nothing sent)."""
        end = self._end
        end.check_open()
        if self._tx is not None:
            raise ChannelError(
                f"transfer {self._tx.header.transfer_id} is still being sent; "
                "finish() or cancel() it first"
            )
        end.check_geometry(header)
        gone = end.peer_gone()  # a receiver that left or died while this end was idle
        if gone is not None:
            raise end.broken(f"starting transfer {header.transfer_id}", gone, gone)
        started = time.perf_counter()
        try:  # first: the receiver gets going while the rest is queued
            end.bell.ring(header.to_bytes(), end.timeout_s)
        except DoorbellError as e:
            raise end.broken("sending the header", e) from e
        # No device work here: the running checksum was zeroed behind the last trailer.
        self._tx = Departure(header=header, started=started)

    def send_message(self, t: Tensor) -> None:
        """Send the next message: its layers already packed, ``[k_m, 2, n, bs, Hk, D]``
        (contiguous, the channel's dtype and device). Returns at once; don't write ``t``
        until :meth:`finish`. A bad tensor cancels the transfer and raises ``ValueError``."""
        end = self._end
        end.check_open()
        tx = self._require_tx("send_message")
        h, m = tx.header, tx.next_msg
        self._refuse(tx, _sent_all(h, m) or end.message_problem(t, h, m))
        self._send_next(tx, t, None)  # queued first: the checksum only reads ``t`` too
        with end.side_stream():
            if end.stream is not None:
                t.record_stream(end.stream)
            self._send_sum += checksum_tensor(t, first_word(h, m))

    def send_from_pool(self, caches: Tensor, block_ids: Tensor) -> None:
        """Pack and send the next message straight from the KV pool: ``caches`` is the
        message's layers of the pool, ``pool[l0:l1]`` ``[k_m, 2, N, bs, Hk, D]``, and
        ``block_ids`` (int64 on the device) the request's blocks in order.

        One kernel gathers the blocks into a staging buffer of the channel and takes the
        message's checksum in the same pass; it runs on the channel's stream after the
        caller's queued work (e.g. the layer's forward pass), and the send follows it. The
        staging buffers are used in turn (:meth:`set_staging_slots`): packing message m+1
        overlaps sending message m."""
        end = self._end
        end.check_open()
        tx = self._require_tx("send_from_pool")
        h, m = tx.header, tx.next_msg
        self._refuse(tx, _sent_all(h, m) or end.pool_problem(caches, block_ids, h, m))
        with end.side_stream():  # once per message (nested entries are free)
            staging = self._tx_staging(h, m)
            if end.stream is not None:  # (the pool outlives every transfer)
                block_ids.record_stream(end.stream)
            _pack(caches, block_ids, staging, first_word(h, m), self._send_sum)
            self._send_next(tx, staging, m % end.staging_slots)

    def finish(self, first_token: int = -1, wait: bool = True) -> Departure:
        """Send the trailer (with the checksum) and wait until the whole transfer left.
        With ``wait=False`` only the trailer is posted and the transfer departs: the next
        one may start at once (its sends queue behind), and :meth:`wait_finished` with the
        returned :class:`Departure` waits until it left (another thread may make that call
        while this one sends the next transfer).

        ``first_token`` rides in the trailer when the header went out before the token was
        sampled (layer-wise streaming during the forward pass); the receiver's
        :meth:`~engine.kv.receiver.KVReceiver.verify` returns it in the header it gives back.

        Raises :class:`ChannelClosed` if it cannot complete within ``timeout_s`` (dead or
        stuck receiver: the channel is aborted). Called before the last layer, it cancels
        the transfer and raises :class:`ChannelError`."""
        self._end.check_open()
        tx = self._require_tx("finish")
        h = tx.header
        if tx.next_msg != h.num_messages:
            sent = h.message_layers(tx.next_msg).start
            self.cancel()
            raise ChannelError(
                f"finish() after {sent} of {h.num_layers} layers of transfer "
                f"{h.transfer_id}; the transfer was cancelled"
            )
        self._send_trailer(tx, STATUS_OK, first_token)
        self._depart(tx)
        if wait:
            self._complete_tx(tx, ok=True)
        return tx

    def wait_finished(self, departure: Departure | None = None) -> None:
        """After ``finish(wait=False)``: wait until ``departure`` (by default the oldest
        departing transfer) left; transfers leave in order, so every earlier one has too.
        Returns at once for one that was seen to leave already. Raises
        :class:`ChannelClosed` like :meth:`finish`."""
        self._end.check_open()
        if departure is None:
            with self._state_lock:
                departure = self._leaving[0] if self._leaving else None
        if departure is None or departure is self._tx:
            raise ChannelError("wait_finished() before finish()" + (
                f" for transfer {self._tx.header.transfer_id}" if self._tx is not None else ""))
        self._complete_tx(departure, ok=True)

    def cancel(self) -> None:
        """End the current transfer as cancelled (no-op when idle). The remaining messages
        go out as zeros and the trailer tells the receiver to drop it."""
        tx = self._tx
        if tx is None:
            return
        end = self._end
        end.check_open()
        h = tx.header
        if tx.next_msg < h.num_messages and h.bytes_per_layer:
            with end.side_stream():
                filler = torch.zeros(h.layers_per_message * h.bytes_per_layer,
                                     dtype=torch.uint8, device=self.device)
            for m in range(tx.next_msg, h.num_messages):
                nbytes = len(h.message_layers(m)) * h.bytes_per_layer
                self._post_send(tx, filler[:nbytes], TAG_LAYER0 + m,
                                f"sending filler for {message_name(h, m)}")
        tx.next_msg = h.num_messages
        self._send_trailer(tx, STATUS_CANCELLED)
        self._depart(tx)
        self._complete_tx(tx, ok=False)
        logger.info("KV channel %r: transfer %d cancelled", self.name, h.transfer_id)

    # ---- internals ------------------------------------------------------------------

    def _forget(self) -> None:
        """Drop every transfer (the channel is closing)."""
        self._tx = None
        with self._state_lock:
            self._leaving = []

    def _require_tx(self, op: str) -> Departure:
        if self._tx is None:
            raise ChannelError(f"{op} without a transfer being sent; send_header() first")
        return self._tx

    def _refuse(self, tx: Departure, problem: str | None) -> None:
        """The next message cannot go out as asked (``problem``): cancel the transfer and
        raise ``ValueError``. No-op when ``problem`` is None."""
        if problem is None:
            return
        h, m = tx.header, tx.next_msg
        self.cancel()
        raise ValueError(
            f"sending transfer {h.transfer_id}, {message_name(h, m)}: {problem}; "
            "the transfer was cancelled"
        )

    def _tx_staging(self, h: TransferHeader, m: int) -> Tensor:
        """The staging buffer for message ``m``; the send that last read it must have left
        first (a stream wait on CUDA, no host sync)."""
        end = self._end
        slot = m % end.staging_slots
        last, end.slot_work[slot] = end.slot_work[slot], None
        if last is not None and not last.done:  # perhaps a departing transfer's send
            if end.is_cuda:
                with end.side_stream():
                    last.work.wait()
            else:
                end.wait_pending(last, time.monotonic() + end.timeout_s, "a previous send")
        return end.staging(slot, h, m)

    def _send_next(self, tx: Departure, t: Tensor, slot: int | None) -> None:
        """Post message ``tx.next_msg`` from ``t`` (staging buffer ``slot``, if one)."""
        h, m = tx.header, tx.next_msg
        sent = self._send_hook(m, t) if self._send_hook is not None else t
        tx.next_msg += 1
        if h.bytes_per_layer:
            self._post_send(tx, sent.reshape(-1).view(torch.uint8), TAG_LAYER0 + m,
                            f"sending {message_name(h, m)}")
            if slot is not None:
                self._end.slot_work[slot] = tx.pending[-1]

    def _post_send(self, tx: Departure, t: Tensor, tag: int, what: str) -> None:
        end = self._end
        try:
            with end.side_stream():
                work = end.pg.send([t], end.peer, tag)
        except Exception as e:
            raise end.broken(f"{what} failed", e) from e
        tx.pending.append(Pending(work, t))

    def _send_trailer(self, tx: Departure, status: int, first_token: int = -1) -> None:
        """Post ``tx``'s trailer from the next buffer of the ring; the running checksum is
        zeroed behind it, ready for the next transfer."""
        end = self._end
        i = self._trailer_next
        self._trailer_next = (i + 1) % TRAILER_RING
        last = self._trailer_work[i]
        if last is not None:  # its host words were copied before that send, too
            end.wait_pending(last, time.monotonic() + end.timeout_s, "an earlier trailer")
        write_trailer(self._trailer_np[i], tx.header, status, first_token)
        t = self._trailer_dev[i]
        with end.side_stream():
            if end.is_cuda:  # no host sync: the copy waits for the packs, not the host
                t.copy_(self._trailer_host[i], non_blocking=True)
            t[TRAILER_CHECKSUM].copy_(self._send_sum)  # stays on the device
            self._send_sum.zero_()
        self._post_send(tx, t, TAG_TRAILER, "sending the trailer")
        self._trailer_work[i] = tx.pending[-1]

    def _depart(self, tx: Departure) -> None:
        """``tx``'s trailer is posted: the channel is free for the next transfer."""
        self._tx = None
        with self._state_lock:
            self._leaving.append(tx)

    def _complete_tx(self, tx: Departure, *, ok: bool) -> None:
        """Wait until everything departing ``tx`` queued has left. (Its sends stay the
        staging buffers' last readers until the next transfer claims them; one seen done is
        not waited for again.)"""
        end = self._end
        deadline = time.monotonic() + end.timeout_s
        for p in tx.pending:
            end.wait_pending(p, deadline, f"transfer {tx.header.transfer_id}")
        with self._state_lock:
            if tx.finished:
                return
            tx.finished = True
            tx.pending = []
            self._leaving = [d for d in self._leaving if d is not tx]
            if ok:
                self.stats.record(tx.header, tx.started)


def _sent_all(h: TransferHeader, m: int) -> str | None:
    return f"all {h.num_layers} layers were already sent" if m >= h.num_messages else None


def _pack(caches: Tensor, block_ids: Tensor, out: Tensor, word_offset: int,
          acc: Tensor) -> None:
    """Fused pack + checksum share added to ``acc`` (Triton on a GPU, the torch reference
    elsewhere). The channel checked the arguments (``pool_problem``)."""
    if out.is_cuda:
        kv_pack.pack_kv_checksum(caches, block_ids, out, word_offset, acc, check=False)
    else:
        kv_pack.pack_kv_checksum_ref(caches, block_ids, out, word_offset, acc)
