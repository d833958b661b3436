"""The decode end of a KV channel (:mod:`engine.kv`): :class:`KVReceiver`.

Staying in sync: after the header was read, every way a transfer can fail short of a broken
channel still moves the whole transfer through the pipe, so the next transfer lines up: a
header the caller rejects, a bad ``out`` tensor or pool argument, or :meth:`KVReceiver.verify`
before the last layer drain the remaining layers and the trailer before raising
(:meth:`KVReceiver.discard`); a checksum mismatch is found after the trailer, so nothing is
left to drain.

An idle receiver sees a sender whose process is gone as a closed doorbell connection
(:class:`ChannelClosed`, logged as a warning); a sender that closed its end on purpose says
goodbye first (:class:`ChannelClosed`, logged as news); a sender that is alive but stuck looks
quiet (:class:`TransferTimeout`): the reservation's lease and the router's health checks
cover that.

Pipelined receiving: the receiver posts the next transfer's first receive while it verifies
the one before (:meth:`KVReceiver.recv_header`), so transfers back to back keep the link busy.
On NCCL, layer receives are only queued; the receiver blocks for the header and in
:meth:`KVReceiver.verify`. A receiver is used by one thread at a time; :meth:`KVReceiver.close`
may come from another (shutdown).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pdserve.engine.kv.channel import ChannelEnd, Link, Pending, TransferStats, first_word
from pdserve.engine.kv.doorbell import DoorbellError, PeerLeft
from pdserve.engine.kv.protocol import (
    STATUS_CANCELLED,
    TAG_LAYER0,
    TAG_TRAILER,
    TRAILER_SLOTS,
    ChannelError,
    ChannelSpec,
    TransferError,
    TransferHeader,
    TransferTimeout,
    checksum_tensor,
    message_name,
    read_trailer,
)
from pdserve.kernels import kv_pack

logger = logging.getLogger(__name__)

_U64 = (1 << 64) - 1
# verify() spins this long at most for the last message and the trailer (one message of a
# bulk transfer, or the last layer's compute when streaming layer-wise), then sleep-polls.
_VERIFY_SPIN_S = 2e-3


@dataclass(eq=False)
class _Incoming:
    """A transfer on the receiving end: its header, the receives posted for it, and where
    its trailer and running checksum land."""

    end: ChannelEnd
    header: TransferHeader
    # The receiver's verify buffer: the trailer lands in words [0, TRAILER_SLOTS), the
    # running checksum (acc) is the last word.
    words: Tensor
    acc: Tensor
    started: float
    next_msg: int = 0
    pending: list[Pending] = field(default_factory=list)  # queued CUDA receives
    posted: dict[int, tuple[Tensor, Any]] = field(default_factory=dict)  # message -> buf, work
    trailer: Any = None  # the trailer's receive (Work), once posted

    def take_message(self, out: Tensor | None) -> Tensor:
        """Message ``next_msg`` in ``out`` or a staging buffer, ordered before the
        channel stream's later work. Into staging, the next messages' receives are posted
        first (one per other buffer), so they flow while this one is consumed."""
        end = self.end
        h, m = self.header, self.next_msg
        self.next_msg += 1
        if not h.bytes_per_layer:
            return out if out is not None else end.staging(m % end.staging_slots, h, m)
        if m not in self.posted and out is not None:
            self.post_recv(m, out, owned=False)
        elif m not in self.posted:
            self.post_recv(m, end.staging(m % end.staging_slots, h, m))
        if out is None:  # every other staging buffer: the next messages' receives
            self.post_ahead(end.staging_slots - 1)
        buf, work = self.posted.pop(m)
        if end.is_cuda:
            with end.side_stream():
                work.wait()  # the channel's stream waits for the NCCL stream; no host sync
            self.pending.append(Pending(work, buf))
        else:
            end.wait(work, time.monotonic() + end.timeout_s, f"receiving {message_name(h, m)}")
        if out is not None and buf is not out:  # posted ahead into staging
            with end.side_stream():
                out.copy_(buf)
            return out
        return buf

    def post_ahead(self, free: int, trailer: bool = True) -> None:
        """Post the receives of messages ``next_msg`` on into the ``free`` staging buffers
        no message handed out still uses (in order: NCCL matches receives to sends by
        order), and the trailer's once every message's receive is out, unless another
        transfer's trailer may still land in the verify buffer (not ``trailer``: this one
        was started during that one's verify, and its trailer receive waits until it is
        handed out). On CUDA a receive into a buffer is ordered after the unpack queued
        from it earlier; on CPU that unpack already ran."""
        end = self.end
        h = self.header
        if not h.bytes_per_layer:
            return
        first = self.next_msg
        for m in range(first, min(first + free, h.num_messages)):
            if m not in self.posted:
                self.post_recv(m, end.staging(m % end.staging_slots, h, m))
        if self.trailer is None and h.num_messages - 1 in self.posted and trailer:
            self.trailer = self.post_trailer_recv()

    def post_recv(self, m: int, buf: Tensor, owned: bool = True) -> None:
        """Post message ``m``'s receive into ``buf``: a staging buffer (``owned``), ordered
        after the channel stream's earlier unpacks from it and, when one was handed out, the
        caller's reads; or the caller's tensor, ordered after the caller's queued work."""
        end = self.end
        try:
            with end.side_stream() if end.caller_reads or not owned else end.on_stream():
                if not owned and end.stream is not None:
                    buf.record_stream(end.stream)
                work = end.pg.recv([buf.reshape(-1).view(torch.uint8)], end.peer,
                                   TAG_LAYER0 + m)
        except Exception as e:
            raise end.broken(f"receiving {message_name(self.header, m)} failed", e) from e
        self.posted[m] = (buf, work)

    def post_trailer_recv(self) -> Any:
        """Post the trailer's receive into the verify buffer; returns its Work. (The
        previous verify read that buffer with a host sync, so nothing reads it now.)"""
        end = self.end
        try:
            with end.on_stream():
                return end.pg.recv([self.words[:TRAILER_SLOTS]], end.peer, TAG_TRAILER)
        except Exception as e:
            raise end.broken("receiving the trailer failed", e) from e


class KVReceiver:
    """The decode end of a per-pair KV channel (rank 1): it receives transfers::

        h = rx.recv_header()                  # waits for the doorbell; TransferTimeout if idle
        match_header(h, tid, epoch, nblocks)  # fail closed: rx.discard() what it rejects
        for m in range(h.num_messages):
            layers = h.message_layers(m)
            rx.recv_into_pool(pool[layers.start:layers.stop], block_ids)  # or recv_message()
        rx.verify()                           # TransferError on checksum mismatch / cancel

    Data reaching the caller's blocks before :meth:`verify` must not be used unless
    :meth:`verify` returns; on failure the reservation's blocks are simply released.
    Open one with :func:`engine.kv.connect.open_receiver`.
    """

    def __init__(self, link: Link) -> None:
        self._end = ChannelEnd(link, forget=self._forget,
                               in_flight=lambda: self.busy or self._next_rx is not None)
        self.name = link.name
        self.spec: ChannelSpec = link.spec
        self.device = link.device
        self._rx: _Incoming | None = None
        # The next transfer, when its header came in while the current one was being
        # verified (its first receive is posted already); recv_header() takes it.
        self._next_rx: _Incoming | None = None
        # The trailer lands in words [0, TRAILER_SLOTS) and the running checksum is the last
        # word, so verify() reads both with one copy to the host. It is never zeroed on the
        # device: a transfer's checksum is its difference from the value the previous verify
        # read (_rx_base), mod 2**64.
        with self._end.on_stream():
            self._verify_words = torch.zeros(TRAILER_SLOTS + 1, dtype=torch.int64,
                                             device=link.device)
        self._rx_base = 0
        # perf_counter() when the doorbell last delivered a header (benchmarks).
        self.last_header_at = 0.0
        self.stats = TransferStats()  # of the transfers verified

    @property
    def closed(self) -> bool:
        return self._end.closed

    @property
    def busy(self) -> bool:
        """A transfer is in progress. (The next one may also be held, its first receive
        posted during :meth:`verify`: see :meth:`recv_header`.)"""
        return self._rx is not None

    @property
    def current(self) -> TransferHeader | None:
        """The header of the transfer being received, if any."""
        return self._rx.header if self._rx is not None else None

    def set_staging_slots(self, n: int) -> None:
        """Use ``n`` (at least 2) staging buffers in turn: ``n - 1`` receives stay posted
        ahead of the message being unpacked. Only between transfers."""
        self._end.set_staging_slots(n, self.busy)

    def close(self, abort: bool = False) -> None:
        """See :meth:`ChannelEnd.close`; a transfer being received is aborted."""
        self._end.close(abort)

    def recv_header(self, timeout_s: float | None = None) -> TransferHeader:
        """Wait up to ``timeout_s`` (default: the channel's) for the next transfer and
        return its header. :class:`TransferTimeout` if none started (channel unaffected).
        The first message's receive is posted before it returns."""
        end = self._end
        end.check_open()
        if self._rx is not None:
            raise ChannelError(
                f"transfer {self._rx.header.transfer_id} is still being received; "
                "verify() or discard() it first"
            )
        if self._next_rx is not None:  # came in during the last verify(), already moving
            self._rx, self._next_rx = self._next_rx, None
            return self._rx.header
        wait_s = end.timeout_s if timeout_s is None else timeout_s
        try:
            raw = end.bell.wait(wait_s)
        except PeerLeft as e:
            end.check_open()  # closed by another thread (shutdown) while it waited
            raise end.fail("the prefill end closed the channel", quiet=True) from e
        except DoorbellError as e:
            end.check_open()
            raise end.fail(f"the prefill end is gone: {e}") from e
        if raw is None:
            raise TransferTimeout(
                f"KV channel {self.name!r}: no transfer started within {wait_s:.3g} s")
        self._rx = self._start_rx(raw)
        return self._rx.header

    def recv_message(self, out: Tensor | None = None) -> Tensor:
        """Receive the next message ``[k_m, 2, n, bs, Hk, D]`` into ``out`` (contiguous, the
        channel's dtype and device) or, by default, into a staging buffer the channel reuses
        (valid until the next call; consume it on the current stream).

        CPU: returns when the data is there (``timeout_s``; on expiry the channel is
        aborted). CUDA: returns once the receive is queued, like any CUDA op: the data is
        ordered before the caller's later work on its current stream, messages stream back
        to back without a host round trip (into the staging buffers, the next message's
        receive is posted before this one is handed out), and a stalled sender surfaces in
        :meth:`verify` (deadline, then abort). Run the receive loop under a CUDA stream of
        its own so a stalled transfer cannot hold up the decode stream. A bad ``out`` drains
        the transfer and raises ``ValueError``."""
        end = self._end
        end.check_open()
        rx = self._require_rx("recv_message")
        h, m = rx.header, rx.next_msg
        self._check_more(rx)
        if out is not None:
            problem = end.message_problem(out, h, m)
            self._refuse(rx, f"bad out tensor: {problem}" if problem else None)
        buf = rx.take_message(out)
        with end.side_stream():
            rx.acc += checksum_tensor(buf, first_word(h, m))
        end.join_side_stream()
        if out is None:
            end.caller_reads = True
        return buf

    def recv_into_pool(self, caches: Tensor, block_ids: Tensor) -> None:
        """Receive the next message and scatter it into the pool: ``caches`` is the
        message's layers of the pool, ``pool[l0:l1]``, and ``block_ids`` (int64 on the
        device) the reserved blocks in the sender's order. One kernel unpacks and takes the
        checksum; like :meth:`recv_message` it only queues work on CUDA. A bad argument
        drains the transfer and raises ``ValueError``."""
        end = self._end
        end.check_open()
        rx = self._require_rx("recv_into_pool")
        h, m = rx.header, rx.next_msg
        self._check_more(rx)
        self._refuse(rx, end.pool_problem(caches, block_ids, h, m))
        with end.side_stream():  # once per message (nested entries are free)
            buf = rx.take_message(None)
            if end.stream is not None:
                block_ids.record_stream(end.stream)
            _unpack(buf, caches, block_ids, first_word(h, m), rx.acc)
        end.join_side_stream()

    def recv_pool_blocks(self, header: TransferHeader, pool: Tensor,
                         block_ids: Tensor) -> TransferHeader:
        """The rest of the transfer ``header`` (from :meth:`recv_header`) into the pool
        ``[L, 2, N, bs, Hk, D]``: :meth:`recv_into_pool` for every message, then
        :meth:`verify`."""
        for m in range(header.num_messages):
            layers = header.message_layers(m)
            self.recv_into_pool(pool[layers.start:layers.stop], block_ids)
        return self.verify()

    def verify(self) -> TransferHeader:
        """Receive the trailer and compare checksums; completes the transfer.

        :class:`TransferError` on a mismatch ("checksum mismatch for transfer 17 ...") or a
        transfer the sender cancelled; the channel stays in sync either way. Called before
        the last layer, it drains the rest and raises."""
        self._end.check_open()
        rx = self._require_rx("verify")
        h = rx.header
        if rx.next_msg != h.num_messages:
            got = h.message_layers(rx.next_msg).start
            self.discard()
            raise TransferError(
                f"verify() after {got} of {h.num_layers} layers of transfer "
                f"{h.transfer_id}; the rest was drained"
            )
        status, sent_sum, first_token, got_sum = self._recv_trailer(rx)
        self._rx = None
        if status == STATUS_CANCELLED:
            raise TransferError(f"transfer {h.transfer_id} was cancelled by the sender")
        if (got_sum - sent_sum) & _U64:
            raise TransferError(
                f"checksum mismatch for transfer {h.transfer_id} (epoch {h.epoch}): "
                f"sender {sent_sum & _U64:#x}, received {got_sum & _U64:#x}"
            )
        self.stats.record(h, rx.started)
        if first_token != -1:
            h = dataclasses.replace(h, first_token=first_token)
        return h

    def discard(self) -> None:
        """Receive (and drop) whatever is left of the current transfer, trailer included, so
        the next transfer lines up. No-op when idle."""
        rx = self._rx
        if rx is None:
            return
        self._end.check_open()
        h = rx.header
        while rx.next_msg < h.num_messages:
            rx.take_message(None)
        self._recv_trailer(rx)
        self._rx = None
        logger.info("KV channel %r: transfer %d drained", self.name, h.transfer_id)

    # ---- internals ------------------------------------------------------------------

    def _forget(self) -> None:
        """Drop every transfer (the channel is closing)."""
        self._rx = self._next_rx = None

    def _require_rx(self, op: str) -> _Incoming:
        if self._rx is None:
            raise ChannelError(f"{op} without a transfer in progress; recv_header() first")
        return self._rx

    def _check_more(self, rx: _Incoming) -> None:
        h = rx.header
        if rx.next_msg >= h.num_messages:
            raise ChannelError(
                f"all {h.num_layers} layers of transfer {h.transfer_id} were received; "
                "call verify()"
            )

    def _refuse(self, rx: _Incoming, problem: str | None) -> None:
        """The next message cannot be received as asked (``problem``): drain the transfer
        and raise ``ValueError``. No-op when ``problem`` is None."""
        if problem is None:
            return
        h, m = rx.header, rx.next_msg
        self.discard()
        raise ValueError(
            f"receiving transfer {h.transfer_id}, {message_name(h, m)}: {problem}; "
            "the transfer was drained"
        )

    def _start_rx(self, raw: bytes) -> _Incoming:
        """A transfer whose header just came off the doorbell, its first receive posted
        before anything else (and before the caller looks at the header: a rejected transfer
        is drained all the same); receiving it posts the next ones."""
        end = self._end
        started = self.last_header_at = time.perf_counter()
        try:
            header = TransferHeader.from_bytes(raw)
        except TransferError as e:
            raise end.fail(f"garbled header: {e}") from e
        try:
            end.check_geometry(header)
        except ChannelError as e:
            raise end.fail(f"protocol violation: {e}") from e
        rx = _Incoming(end=end, header=header, words=self._verify_words,
                       acc=self._verify_words[TRAILER_SLOTS], started=started)
        rx.post_ahead(1, trailer=self._rx is None)
        return rx

    def _prefetch_next(self) -> None:
        """While the current transfer is verified: if the next one's header is in already
        (a sender with transfers queued rings as soon as the current one left), post its
        first receive now, so it moves right behind this one's trailer."""
        if self._next_rx is not None or self._rx is None or self._rx.trailer is None:
            return
        raw = self._end.bell.poll()
        if raw is not None:
            self._next_rx = self._start_rx(raw)

    def _recv_trailer(self, rx: _Incoming) -> tuple[int, int, int, int]:
        """Wait for the rest of the transfer; returns the trailer's status, checksum and
        first token, and the checksum of what was received."""
        end = self._end
        h = rx.header
        if rx.trailer is None:
            rx.trailer = rx.post_trailer_recv()
        self._prefetch_next()
        deadline = time.monotonic() + end.timeout_s
        # Messages land in order: sleep through all but the last, then spin (for a bounded
        # time, looking for the next transfer's header) until the trailer is in, so the end
        # is seen within microseconds.
        for p in rx.pending[:-1]:
            end.wait(p.work, deadline, f"receiving transfer {h.transfer_id}")
        with end.side_stream():
            end.wait(rx.trailer, deadline, "receiving the trailer", spin_s=_VERIFY_SPIN_S,
                     on_spin=self._prefetch_next)
        for p in rx.pending[-1:]:
            end.wait(p.work, deadline, f"receiving transfer {h.transfer_id}")
        rx.pending.clear()
        with end.side_stream():  # after the last unpack: one copy for trailer and checksum
            v = [int(x) for x in self._verify_words.tolist()]
        trailer = read_trailer(v, h)
        if trailer is None:
            raise end.fail(f"garbled trailer for transfer {h.transfer_id}: {v[:6]}")
        got, self._rx_base = (v[TRAILER_SLOTS] - self._rx_base) & _U64, v[TRAILER_SLOTS]
        return (*trailer, got)


def _unpack(buf: Tensor, caches: Tensor, block_ids: Tensor, word_offset: int,
            acc: Tensor) -> None:
    """Fused unpack + checksum share added to ``acc`` (Triton on a GPU, the torch reference
    elsewhere). The channel checked the arguments (``pool_problem``)."""
    if buf.is_cuda:
        kv_pack.unpack_kv_checksum(buf, caches, block_ids, word_offset, acc, check=False)
    else:
        kv_pack.unpack_kv_checksum_ref(buf, caches, block_ids, word_offset, acc)
