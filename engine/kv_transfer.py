"""KV transfer between a prefill worker and a decode worker (DESIGN.md section 5).

One :class:`KVChannel` per (prefill, decode) pair: a two-rank process group built without a
global world (no ``init_process_group``), so workers can join and leave freely.

* The decode side hosts a ``TCPStore`` (:meth:`KVChannel.host_store`); the prefill side
  connects to it (:meth:`KVChannel.connect_store`). Each channel lives in its own namespace
  ``pdserve/kv/{name}/`` of that store, over a connection of its own (a store connection
  serializes its operations, and the handshake and rendezvous block in store waits), so one
  process can hold several channels.
* :meth:`KVChannel.open` (both sides) first runs a **handshake**: each side publishes its
  :class:`ChannelSpec` as JSON and compares it with the peer's; any difference raises
  :class:`HandshakeError` on both sides, naming every differing field with both values, and
  no process group is created. Then the prefill side connects to the decode side's
  **doorbell** (:mod:`engine.kv_doorbell`, a TCP connection that carries each transfer's
  header), and both build ``ProcessGroupGloo`` (CPU tensors) or ``ProcessGroupNCCL`` (CUDA
  tensors) of size 2: rank 0 is the prefill side (it sends), rank 1 the decode side (it
  receives).

The wire protocol (framing, header, trailer, checksum, doorbell) is defined in
:mod:`engine.kv_protocol`.

Staying in sync: after the header was read, every way a transfer can fail short of a broken
channel still moves the whole transfer through the pipe, so the next transfer lines up:

* receiver side: a header that does not match the caller's reservation (:meth:`match`), a bad
  ``out`` tensor, a sink that raises (:meth:`recv_blocks`) or :meth:`verify` before the last
  layer drain the remaining layers and the trailer before raising (:meth:`discard`); a
  checksum mismatch is found after the trailer, so nothing is left to drain;
* sender side: a bad layer tensor, an extra layer, :meth:`finish` before the last layer or a
  failing layer source (:meth:`send_blocks`) *cancel* the transfer: the remaining layers go
  out as zeros and the trailer says "cancelled", which the receiver reports as a
  :class:`TransferError`.

A truly broken channel (a send/receive timed out, the peer died, a garbled header or trailer)
is aborted and marked :attr:`KVChannel.closed`; every later call raises :class:`ChannelClosed`
and the owner opens a fresh channel under a new name. An idle receiver sees a sender whose
process is gone as a closed doorbell connection (:class:`ChannelClosed`, logged as a warning);
a sender that closed its end on purpose says goodbye first (:class:`ChannelClosed`, logged as
news); a sender that is alive but stuck looks quiet (:class:`TransferTimeout`): the
reservation's lease and the router's health checks cover that.

Pipelined sending: once :meth:`KVChannel.finish` posted a transfer's trailer (``wait=False``),
the next transfer may start at once; its sends queue behind the departing one's on the same
NCCL stream, and the receiver posts its first receive while it verifies the one before
(:meth:`KVChannel.recv_header`), so transfers back to back keep the link busy.

Thread safety: a channel end is used by one thread at a time, except that on the sending
end :meth:`KVChannel.wait_finished` for a departing transfer may run on another thread while
the next one is being sent; :meth:`KVChannel.close` may also come from another thread
(shutdown).

NCCL notes (untested on CPU-only machines; DESIGN.md section 10 reports the channel shape
working between two Ray actors): the process group is bound to the tensors' device and
connected eagerly, so point-to-point traffic reuses that communicator; all channel work runs
on a dedicated CUDA stream that first waits on the caller's current stream, and received data
is ordered before the caller's later work on its current stream. Layer sends and receives are
only queued (no host round trip between layers); the sender blocks in :meth:`finish`, the
receiver for the header and in :meth:`verify`. Every blocking wait polls with the channel's
own deadline and calls ``abort()`` on expiry; the NCCL watchdog timeout is set well above it
as a backstop. ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` defaults to tearing the whole process down
when the watchdog fires; the channel sets it to ``2`` (abort the communicator only) unless the
environment already chose.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pdserve.engine.kv_doorbell import Doorbell, DoorbellError, PeerLeft
from pdserve.engine.kv_protocol import (
    _T_CHECKSUM,
    _T_EPOCH,
    _T_FIRST_TOKEN,
    _T_MAGIC,
    _T_STATUS,
    _T_TRANSFER_ID,
    _T_VERSION,
    _TAG_LAYER0,
    _TAG_TRAILER,
    HEADER_SLOTS,
    KV_LAYOUT,
    PROTOCOL_VERSION,
    STATUS_CANCELLED,
    STATUS_OK,
    TRAILER_MAGIC,
    TRAILER_SLOTS,
    ChannelClosed,
    ChannelError,
    ChannelSpec,
    HandshakeError,
    TransferError,
    TransferHeader,
    TransferTimeout,
    _checksum_tensor,
    _dtype_name,
    kv_checksum,
    match_header,
    spec_differences,
)
from pdserve.kernels import kv_pack

logger = logging.getLogger(__name__)

_U64 = (1 << 64) - 1
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,200}$")
_ROLE = ("prefill", "decode")
STAGING_SLOTS = 2  # default number of staging buffers (see KVChannel.set_staging_slots)
# verify() spins this long at most for the last message and the trailer (one message of a
# bulk transfer, or the last layer's compute when streaming layer-wise), then sleep-polls.
_VERIFY_SPIN_S = 2e-3
# The sender's trailers are built in a ring of this many buffers (pinned host memory and
# device memory): one is reused only once the trailer it last carried has left, which with
# transfers in flight back to back is long since.
_TRAILER_RING = 8
# A wait on NCCL work longer than this looks at the doorbell connection every as often: a
# peer that aborted its communicator (a broken or closed channel) never completes its side,
# and its closed connection says so (the CPU backend, Gloo, raises on its own).
_PEER_CHECK_S = 5e-3
# Once the peer is seen gone, work still waited for gets this long to complete (what the peer
# sent before it went may still be landing) before the channel gives up.
_PEER_GONE_GRACE_S = 0.5


# --------------------------------------------------------------------------------------
# The channel
# --------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Pending:
    work: Any  # torch.distributed Work
    tensor: Tensor  # kept alive until the work completed
    # A Gloo work may be waited for once only, and two threads may want to (the next
    # transfer reusing a staging buffer, and wait_finished): the first one waits.
    done: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(eq=False)
class Departure:
    """A transfer on the sending end: being sent, then (once :meth:`KVChannel.finish` posted
    its trailer) departing until everything it queued has left. ``finish`` returns it; with
    ``wait=False``, :meth:`KVChannel.wait_finished` takes it."""

    header: TransferHeader
    started: float
    next_msg: int = 0
    pending: list[_Pending] = field(default_factory=list)
    finished: bool = False  # every queued send completed (and was accounted for)


@dataclass
class _RxState:
    header: TransferHeader
    acc: Tensor  # running checksum: the last word of the channel's verify buffer
    started: float
    next_msg: int = 0
    pending: list[_Pending] = field(default_factory=list)  # queued CUDA receives
    posted: dict[int, tuple[Tensor, Any]] = field(default_factory=dict)  # message -> buf, work
    trailer: Any = None  # the trailer's receive (Work), once posted; it lands in the
    # channel's verify buffer


def _normalize_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ChannelError("a CUDA KV channel needs CUDA")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ChannelError(f"KV channels support cpu (Gloo) and cuda (NCCL), not {device}")
    return device


class KVChannel:
    """One end of a per-pair KV channel; rank 0 (prefill) sends, rank 1 (decode) receives.

    Sender (straight from the KV pool; the channel packs and checksums in one pass)::

        h = TransferHeader.for_spec(spec, transfer_id=..., epoch=..., num_blocks=...,
                                    num_tokens=..., layers_per_message=k)
        ch.send_header(h)
        for m in range(h.num_messages):      # layer-wise streaming: k = 1, one per layer
            layers = h.message_layers(m)
            ch.send_from_pool(pool[layers.start:layers.stop], block_ids)  # returns at once
        ch.finish(first_token)  # sends the trailer, waits until everything left (or raises)

    (:meth:`send_message` sends caller-packed ``[k_m, 2, n, bs, Hk, D]`` tensors instead.)

    Receiver::

        h = ch.recv_header()                  # waits for the doorbell; TransferTimeout if idle
        ch.match(h, tid, epoch, nblocks)      # fail closed: drains the transfer and raises
        for m in range(h.num_messages):
            layers = h.message_layers(m)
            ch.recv_into_pool(pool[layers.start:layers.stop], block_ids)  # or recv_message()
        ch.verify()                           # TransferError on checksum mismatch / cancel

    Data reaching the caller's blocks before :meth:`verify` must not be used unless
    :meth:`verify` returns; on failure the reservation's blocks are simply released.
    """

    def __init__(
        self,
        *,
        name: str,
        rank: int,
        spec: ChannelSpec,
        device: torch.device,
        timeout_s: float,
        pg: Any,
        namespace: dist.Store,
        stores: list[dist.Store],
        bell: Doorbell,
    ) -> None:
        # Use KVChannel.open(); this only wires the parts together.
        self.name = name
        self.rank = rank
        self.spec = spec
        self.device = device
        self.timeout_s = timeout_s
        self._pg: Any = pg
        self._ns: dist.Store | None = namespace
        self._stores = stores  # keeps the (cloned / owned) stores alive until close()
        self._peer = 1 - rank
        self._is_cuda = device.type == "cuda"
        self._stream: torch.cuda.Stream | None = (
            torch.cuda.Stream(device=device) if self._is_cuda else None
        )
        self._bell = bell
        self._closed_reason: str | None = None
        # Serializes close(): the receive thread (a dead peer) and worker shutdown may
        # close at once, and the second caller must return only once teardown is done.
        self._close_lock = threading.Lock()
        self._tx: Departure | None = None  # being sent (header out, trailer not yet)
        self._leaving: list[Departure] = []  # trailer posted, not yet seen to have left
        # Guards what a thread in wait_finished() shares with the thread sending the next
        # transfer: _leaving and the stats.
        self._state_lock = threading.Lock()
        self._rx: _RxState | None = None
        # Staging buffers used in turn by message (pack or receive the next ones while m
        # moves), and on the sender the send that last read each one.
        self.staging_slots = STAGING_SLOTS
        self._slots: list[Tensor | None] = [None] * self.staging_slots
        self._slot_work: list[_Pending | None] = [None] * self.staging_slots
        # Sender: the running checksum (0-d int64), which every message's pack adds to; the
        # trailer takes it and zeroes it behind itself (stream order), ready for the next.
        # Receiver: the trailer lands in words [0, TRAILER_SLOTS) and the running checksum
        # is the last word, so verify() reads both with one copy to the host. It is never
        # zeroed on the device: a transfer's checksum is its difference from the value the
        # previous verify read (_rx_base), mod 2**64.
        with self._on_stream():
            self._send_sum = torch.zeros((), dtype=torch.int64, device=device)
            self._verify_words = torch.zeros(TRAILER_SLOTS + 1, dtype=torch.int64,
                                             device=device)
        # Sender: the trailer ring (see _TRAILER_RING). Its words are written on the host
        # (through a NumPy view) and copied to the device behind the transfer's packs, then
        # the checksum word is taken from the running checksum: no host sync, no allocation.
        self._trailer_host = torch.zeros((_TRAILER_RING, TRAILER_SLOTS), dtype=torch.int64,
                                         pin_memory=self._is_cuda and rank == 0)
        self._trailer_np = self._trailer_host.numpy()
        self._trailer_dev = (torch.zeros_like(self._trailer_host, device=device)
                             if self._is_cuda and rank == 0 else self._trailer_host)
        self._trailer_work: list[_Pending | None] = [None] * _TRAILER_RING
        self._trailer_next = 0
        self._rx_base = 0
        # A staging buffer was handed to the caller (recv_message), who may still read it on
        # its stream: the next receive into staging waits for that stream first.
        self._caller_reads = False
        # Staging views by (slot, layers, blocks): each message's view is built once.
        self._views: dict[tuple[int, int, int], Tensor] = {}
        # Receiver: the next transfer, when its header came in while the current one was
        # being verified (its first receive is posted already); recv_header() takes it.
        self._next_rx: _RxState | None = None
        # Test hook: (message, tensor) -> tensor actually sent, applied after the checksum.
        self._send_hook: Callable[[int, Tensor], Tensor] | None = None
        # perf_counter() when the doorbell last delivered a header (benchmarks).
        self.last_header_at = 0.0
        # Stats of the last completed transfer, for metrics.
        self.last_transfer_seconds = 0.0
        self.last_transfer_bytes = 0
        self.total_transfers = 0
        self.total_bytes = 0

    # ---- stores ---------------------------------------------------------------------

    @staticmethod
    def host_store(
        host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0
    ) -> tuple[dist.TCPStore, int]:
        """Decode side: host the store the channels to this worker rendezvous through.
        ``port=0`` picks a free port; returns the store and its actual port."""
        store = dist.TCPStore(
            host, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False
        )
        return store, int(store.port)

    @staticmethod
    def connect_store(host: str, port: int, timeout_s: float = 30.0) -> dist.TCPStore:
        """Prefill side: a client of the decode worker's store."""
        return dist.TCPStore(
            host, port, None, False, timedelta(seconds=timeout_s), wait_for_workers=False
        )

    # ---- open / close ---------------------------------------------------------------

    @classmethod
    def open(
        cls,
        *,
        store: dist.Store,
        name: str,
        rank: int,
        spec: ChannelSpec,
        device: torch.device | str,
        timeout_s: float,
        open_timeout_s: float | None = None,
        gloo_host: str | None = None,
        owns_store: bool = False,
    ) -> KVChannel:
        """Both sides call this with the same ``name`` (unique per pairing and store: a name
        is never reused, not even after close) and their own ``rank`` (0 prefill, 1 decode).

        Handshake first (:class:`HandshakeError` on any spec difference, on both sides), then
        the two-rank process group: Gloo for a cpu ``device``, NCCL for a cuda one.
        ``open_timeout_s`` (default ``timeout_s``) bounds the handshake and the process
        group's rendezvous, where the peer may still be starting; ``timeout_s`` bounds every
        later blocking step. ``gloo_host`` is the address Gloo listens on (default: Gloo's
        default device; GLOO_SOCKET_IFNAME is honoured). With ``owns_store`` the channel
        keeps ``store`` alive and releases it on :meth:`close`.
        """
        if rank not in (0, 1):
            raise ValueError(f"rank must be 0 (prefill) or 1 (decode), got {rank}")
        if not _NAME_RE.match(name):
            raise ValueError(f"bad channel name {name!r} (letters, digits, _.:@- only)")
        open_s = timeout_s if open_timeout_s is None else open_timeout_s
        if timeout_s <= 0 or open_s <= 0:
            raise ValueError(f"timeouts must be positive, got {timeout_s} and {open_s}")
        dev = _normalize_device(device)

        base = _private_client(store, timedelta(seconds=open_s))
        ns = dist.PrefixStore(f"pdserve/kv/{name}/", base)

        _handshake(ns, name=name, rank=rank, spec=spec, timeout_s=open_s)
        try:
            bell = (Doorbell.connect(ns, name, open_s) if rank == 0
                    else Doorbell.listen(ns, _listen_host(store), name, open_s))
        except DoorbellError as e:
            raise ChannelError(f"KV channel {name!r}: {e}") from e

        pg_store = dist.PrefixStore("pg/", ns)
        try:
            if dev.type == "cuda":
                pg = _make_nccl(pg_store, rank, dev, timeout_s, name)
            else:
                pg = _make_gloo(pg_store, rank, timedelta(seconds=max(open_s, timeout_s)),
                                gloo_host)
        except Exception as e:
            bell.close()
            raise ChannelError(
                f"KV channel {name!r}: could not build the process group as rank {rank}: {e}"
            ) from e
        stores = [base, store] if owns_store else [base]
        logger.info("KV channel %r open as rank %d (%s) on %s", name, rank, _ROLE[rank], dev)
        return cls(
            name=name, rank=rank, spec=spec, device=dev, timeout_s=timeout_s, pg=pg,
            namespace=ns, stores=stores, bell=bell,
        )

    def set_staging_slots(self, n: int) -> None:
        """Use ``n`` (at least 2) staging buffers in turn: on the sender, packing runs up to
        ``n - 1`` messages ahead of the send that frees a buffer; on the receiver, ``n - 1``
        receives stay posted ahead of the message being unpacked. Only between transfers."""
        if n < 2:
            raise ValueError(f"staging_slots must be at least 2, got {n}")
        if self.busy:
            raise ChannelError("set_staging_slots during a transfer")
        self.staging_slots = n
        self._slots = [None] * n
        self._slot_work = [None] * n
        self._views = {}

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    @property
    def busy(self) -> bool:
        """A transfer is in progress on this end. (A receiver may also hold the next one,
        its first receive posted during :meth:`verify`: see :meth:`recv_header`.)"""
        return self._tx is not None or self._rx is not None or bool(self._leaving)

    def close(self, abort: bool = False) -> None:
        """Tear down the process group (abort if broken, mid-transfer or ``abort``, else shut
        down), close the doorbell (a receiver waiting on it returns at once) and release the
        stores. Idempotent and thread-safe: a caller racing another close returns once that
        teardown is done. A clean NCCL shutdown waits until the peer tears its end down too;
        ``abort`` never waits for the peer (worker shutdown)."""
        with self._close_lock:
            if self._pg is None:
                return
            pg, self._pg = self._pg, None
            broken = (abort or self._closed_reason is not None or self.busy
                      or self._next_rx is not None)
            # An end closing a sound channel says goodbye: the other end then knows the peer
            # left (shutdown) rather than died.
            goodbye = self._closed_reason is None
            if self._closed_reason is None:
                self._closed_reason = "closed"
            self._tx = self._rx = self._next_rx = None
            with self._state_lock:
                self._leaving = []
            self._bell.close(goodbye=goodbye)
            try:
                if broken:
                    pg.abort()
                else:
                    pg.shutdown()
            except Exception as e:  # teardown is best effort
                logger.warning("KV channel %r: teardown: %s", self.name, e)
            del pg
            self._ns = None
            self._stores = []
            self._slots = [None] * self.staging_slots
            self._slot_work = [None] * self.staging_slots
            self._views = {}

    def __enter__(self) -> KVChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- sending (rank 0) -----------------------------------------------------------

    def send_header(self, header: TransferHeader) -> None:
        """Start a transfer: ring the doorbell with the header."""
        self._check_open()
        self._require_rank(0, "send_header")
        if self._tx is not None:
            raise ChannelError(
                f"transfer {self._tx.header.transfer_id} is still being sent; "
                "finish() or cancel() it first"
            )
        self._check_geometry(header)
        started = time.perf_counter()
        try:  # first: the receiver gets going while the rest is queued
            self._bell.ring(header.to_bytes(), self.timeout_s)
        except DoorbellError as e:
            raise self._broken("sending the header", e) from e
        # No device work here: the running checksum was zeroed behind the last trailer.
        self._tx = Departure(header=header, started=started)

    def send_message(self, t: Tensor) -> None:
        """Send the next message: its layers already packed, ``[k_m, 2, n, bs, Hk, D]``
        (contiguous, the channel's dtype and device). Returns at once; don't write ``t``
        until :meth:`finish`. A bad tensor cancels the transfer and raises ``ValueError``."""
        self._check_open()
        tx = self._require_tx("send_message")
        h, m = tx.header, tx.next_msg
        self._refuse(tx, self._sent_all(h, m) or self._message_problem(t, h, m))
        self._send_next(tx, t, None)  # queued first: the checksum only reads ``t`` too
        with self._side_stream():
            if self._stream is not None:
                t.record_stream(self._stream)
            self._send_sum += _checksum_tensor(t, self._word_offset(h, m))

    def send_layer(self, t: Tensor) -> None:
        """:meth:`send_message` for a one-layer message (``layers_per_message == 1``):
        ``t`` is ``[2, n, bs, Hk, D]``."""
        tx = self._require_tx("send_layer")
        if tx.header.layers_per_message != 1:
            raise ChannelError(
                f"send_layer in transfer {tx.header.transfer_id}, whose messages hold "
                f"{tx.header.layers_per_message} layers; use send_message"
            )
        self.send_message(t.unsqueeze(0))

    def send_from_pool(self, caches: Tensor, block_ids: Tensor) -> None:
        """Pack and send the next message straight from the KV pool: ``caches`` is the
        message's layers of the pool, ``pool[l0:l1]`` ``[k_m, 2, N, bs, Hk, D]``, and
        ``block_ids`` (int64 on the device) the request's blocks in order.

        One kernel gathers the blocks into a staging buffer of the channel and takes the
        message's checksum in the same pass; it runs on the channel's stream after the
        caller's queued work (e.g. the layer's forward pass), and the send follows it. The
        staging buffers are used in turn (:meth:`set_staging_slots`): packing message m+1
        overlaps sending message m."""
        self._check_open()
        tx = self._require_tx("send_from_pool")
        h, m = tx.header, tx.next_msg
        self._refuse(tx, self._sent_all(h, m) or self._pool_problem(caches, block_ids, h, m))
        with self._side_stream():  # once per message (nested entries are free)
            staging = self._tx_staging(h, m)
            if self._stream is not None:  # (the pool outlives every transfer)
                block_ids.record_stream(self._stream)
            _pack(caches, block_ids, staging, self._word_offset(h, m), self._send_sum)
            self._send_next(tx, staging, m % self.staging_slots)

    def finish(self, first_token: int = -1, wait: bool = True) -> Departure:
        """Send the trailer (with the checksum) and wait until the whole transfer left.
        With ``wait=False`` only the trailer is posted and the transfer departs: the next
        one may start at once (its sends queue behind), and :meth:`wait_finished` with the
        returned :class:`Departure` waits until it left (another thread may make that call
        while this one sends the next transfer).

        ``first_token`` rides in the trailer when the header went out before the token was
        sampled (layer-wise streaming during the forward pass); the receiver's
        :meth:`verify` returns it in the header it gives back.

        Raises :class:`ChannelClosed` if it cannot complete within ``timeout_s`` (dead or
        stuck receiver: the channel is aborted). Called before the last layer, it cancels
        the transfer and raises :class:`ChannelError`."""
        self._check_open()
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
        self._check_open()
        self._require_rank(0, "wait_finished")
        if departure is None:
            with self._state_lock:
                departure = self._leaving[0] if self._leaving else None
        if departure is None or departure is self._tx:
            raise ChannelError("wait_finished() before finish()" + (
                f" for transfer {self._tx.header.transfer_id}" if self._tx is not None else ""))
        self._complete_tx(departure, ok=True)

    def cancel(self) -> None:
        """Sender: end the current transfer as cancelled (no-op when idle). The remaining
        messages go out as zeros and the trailer tells the receiver to drop it."""
        tx = self._tx
        if tx is None:
            return
        self._check_open()
        h = tx.header
        if tx.next_msg < h.num_messages and h.bytes_per_layer:
            with self._side_stream():
                filler = torch.zeros(h.layers_per_message * h.bytes_per_layer,
                                     dtype=torch.uint8, device=self.device)
            for m in range(tx.next_msg, h.num_messages):
                nbytes = len(h.message_layers(m)) * h.bytes_per_layer
                self._post_send(tx, filler[:nbytes], _TAG_LAYER0 + m,
                                f"sending filler for {_what(h, m)}")
        tx.next_msg = h.num_messages
        self._send_trailer(tx, STATUS_CANCELLED)
        self._depart(tx)
        self._complete_tx(tx, ok=False)
        logger.info("KV channel %r: transfer %d cancelled", self.name, h.transfer_id)

    def send_blocks(self, header: TransferHeader, layers: Iterable[Tensor]) -> None:
        """:meth:`send_header`, :meth:`send_message` for each packed message (``[2, n, ...]``
        layers are taken as one-layer messages), :meth:`finish`. If ``layers`` raises (e.g.
        packing failed), the transfer is cancelled and the error re-raised."""
        self.send_header(header)
        try:
            for t in layers:
                self.send_message(t.unsqueeze(0) if t.dim() == 5 else t)
        except Exception:
            if self._tx is not None and not self.closed:
                self.cancel()
            raise
        self.finish()

    def send_pool_blocks(self, header: TransferHeader, pool: Tensor, block_ids: Tensor,
                         first_token: int = -1) -> None:
        """A whole transfer from the pool ``[L, 2, N, bs, Hk, D]``: header, every message
        with :meth:`send_from_pool`, trailer; waits until it left."""
        self.send_header(header)
        for m in range(header.num_messages):
            layers = header.message_layers(m)
            self.send_from_pool(pool[layers.start:layers.stop], block_ids)
        self.finish(first_token)

    # ---- receiving (rank 1) ---------------------------------------------------------

    def recv_header(self, timeout_s: float | None = None) -> TransferHeader:
        """Wait up to ``timeout_s`` (default: the channel's) for the next transfer and
        return its header. :class:`TransferTimeout` if none started (channel unaffected).
        The first message's receive is posted before it returns."""
        self._check_open()
        self._require_rank(1, "recv_header")
        if self._rx is not None:
            raise ChannelError(
                f"transfer {self._rx.header.transfer_id} is still being received; "
                "verify() or discard() it first"
            )
        if self._next_rx is not None:  # came in during the last verify(), already moving
            self._rx, self._next_rx = self._next_rx, None
            return self._rx.header
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            raw = self._bell.wait(wait_s)
        except PeerLeft as e:
            self._check_open()  # closed by another thread (shutdown) while it waited
            raise self._fail("the prefill end closed the channel", quiet=True) from e
        except DoorbellError as e:
            self._check_open()
            raise self._fail(f"the prefill end is gone: {e}") from e
        if raw is None:
            raise TransferTimeout(
                f"KV channel {self.name!r}: no transfer started within {wait_s:.3g} s")
        self._rx = self._start_rx(raw)
        return self._rx.header

    def _start_rx(self, raw: bytes) -> _RxState:
        """A transfer whose header just came off the doorbell, its first receive posted
        before anything else (and before the caller looks at the header: a rejected transfer
        is drained all the same); receiving it posts the next ones."""
        started = self.last_header_at = time.perf_counter()
        try:
            header = TransferHeader.from_bytes(raw)
        except TransferError as e:
            raise self._fail(f"garbled header: {e}") from e
        try:
            self._check_geometry(header)
        except ChannelError as e:
            raise self._fail(f"protocol violation: {e}") from e
        rx = _RxState(header=header, acc=self._verify_words[TRAILER_SLOTS], started=started)
        self._post_ahead(rx, 1)
        return rx

    def _prefetch_next(self) -> None:
        """While the current transfer is verified: if the next one's header is in already
        (a sender with transfers queued rings as soon as the current one left), post its
        first receive now, so it moves right behind this one's trailer."""
        if self._next_rx is not None or self._rx is None or self._rx.trailer is None:
            return
        raw = self._bell.poll()
        if raw is not None:
            self._next_rx = self._start_rx(raw)

    def match(
        self,
        header: TransferHeader,
        expected_transfer_id: int,
        expected_epoch: int,
        expected_blocks: int,
    ) -> None:
        """:func:`match_header`, draining the rejected transfer before raising so that the
        channel stays in sync."""
        try:
            match_header(header, expected_transfer_id, expected_epoch, expected_blocks)
        except TransferError:
            if self._rx is not None and self._rx.header == header:
                self._drain_current()
            raise

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
        self._check_open()
        rx = self._require_rx("recv_message")
        h, m = rx.header, rx.next_msg
        self._check_more(rx)
        if out is not None:
            problem = self._message_problem(out, h, m)
            self._refuse(rx, f"bad out tensor: {problem}" if problem else None)
        buf = self._take_message(rx, out)
        with self._side_stream():
            rx.acc += _checksum_tensor(buf, self._word_offset(h, m))
        self._join_side_stream()
        if out is None:
            self._caller_reads = True
        return buf

    def recv_layer(self, out: Tensor | None = None) -> Tensor:
        """:meth:`recv_message` for a one-layer message: returns ``[2, n, bs, Hk, D]``."""
        rx = self._require_rx("recv_layer")
        if rx.header.layers_per_message != 1:
            raise ChannelError(
                f"recv_layer in transfer {rx.header.transfer_id}, whose messages hold "
                f"{rx.header.layers_per_message} layers; use recv_message"
            )
        buf = self.recv_message(None if out is None else out.unsqueeze(0))[0]
        return buf if out is None else out

    def recv_into_pool(self, caches: Tensor, block_ids: Tensor) -> None:
        """Receive the next message and scatter it into the pool: ``caches`` is the
        message's layers of the pool, ``pool[l0:l1]``, and ``block_ids`` (int64 on the
        device) the reserved blocks in the sender's order. One kernel unpacks and takes the
        checksum; like :meth:`recv_message` it only queues work on CUDA. A bad argument
        drains the transfer and raises ``ValueError``."""
        self._check_open()
        rx = self._require_rx("recv_into_pool")
        h, m = rx.header, rx.next_msg
        self._check_more(rx)
        self._refuse(rx, self._pool_problem(caches, block_ids, h, m))
        with self._side_stream():  # once per message (nested entries are free)
            buf = self._take_message(rx, None)
            if self._stream is not None:
                block_ids.record_stream(self._stream)
            _unpack(buf, caches, block_ids, self._word_offset(h, m), rx.acc)
        self._join_side_stream()

    def verify(self) -> TransferHeader:
        """Receive the trailer and compare checksums; completes the transfer.

        :class:`TransferError` on a mismatch ("checksum mismatch for transfer 17 ...") or a
        transfer the sender cancelled; the channel stays in sync either way. Called before
        the last layer, it drains the rest and raises."""
        self._check_open()
        rx = self._require_rx("verify")
        h = rx.header
        if rx.next_msg != h.num_messages:
            got = h.message_layers(rx.next_msg).start
            self._drain_current()
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
        self._record_stats(h, rx.started)
        if first_token != -1:
            h = dataclasses.replace(h, first_token=first_token)
        return h

    def discard(self) -> None:
        """Receiver: drop the rest of the current transfer (remaining layers and trailer) so
        the next transfer lines up. No-op when idle."""
        self._drain_current()

    def recv_blocks(
        self,
        resolve: Callable[[TransferHeader], Callable[[int, Tensor], None]],
        timeout_s: float | None = None,
    ) -> TransferHeader:
        """Receive one whole transfer.

        ``resolve(header)`` looks up the caller's reservation, checks it (e.g. with
        :func:`match_header`; raise to reject) and returns a sink ``(layer, buf)`` that
        consumes each layer ``[2, n, bs, Hk, D]`` (e.g. unpacks it into the reserved
        blocks). Rejections and sink errors drain the transfer and re-raise; :meth:`verify`
        runs at the end."""
        header = self.recv_header(timeout_s)
        try:
            sink = resolve(header)
            for m in range(header.num_messages):
                buf = self.recv_message()
                for i, layer in enumerate(header.message_layers(m)):
                    sink(layer, buf[i])
        except Exception:
            if not self.closed:
                self._drain_current()
            raise
        return self.verify()

    def recv_pool_blocks(self, header: TransferHeader, pool: Tensor,
                         block_ids: Tensor) -> TransferHeader:
        """The rest of the transfer ``header`` (from :meth:`recv_header`) into the pool
        ``[L, 2, N, bs, Hk, D]``: :meth:`recv_into_pool` for every message, then
        :meth:`verify`."""
        for m in range(header.num_messages):
            layers = header.message_layers(m)
            self.recv_into_pool(pool[layers.start:layers.stop], block_ids)
        return self.verify()

    # ---- internals ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed_reason is not None:
            raise ChannelClosed(f"KV channel {self.name!r} is closed: {self._closed_reason}")

    def _require_rank(self, rank: int, op: str) -> None:
        if self.rank != rank:
            raise ChannelError(
                f"{op} belongs to the {_ROLE[rank]} end (rank {rank}); this end is "
                f"rank {self.rank} ({_ROLE[self.rank]})"
            )

    def _require_tx(self, op: str) -> Departure:
        self._require_rank(0, op)
        if self._tx is None:
            raise ChannelError(f"{op} without a transfer being sent; send_header() first")
        return self._tx

    def _require_rx(self, op: str) -> _RxState:
        self._require_rank(1, op)
        if self._rx is None:
            raise ChannelError(f"{op} without a transfer in progress; recv_header() first")
        return self._rx

    def _check_more(self, rx: _RxState) -> None:
        h = rx.header
        if rx.next_msg >= h.num_messages:
            raise ChannelError(
                f"all {h.num_layers} layers of transfer {h.transfer_id} were received; "
                "call verify()"
            )

    @staticmethod
    def _sent_all(h: TransferHeader, m: int) -> str | None:
        return f"all {h.num_layers} layers were already sent" if m >= h.num_messages else None

    def _refuse(self, st: Departure | _RxState, problem: str | None) -> None:
        """The next message cannot go out or be received as asked (``problem``): cancel
        (sender) or drain (receiver) the transfer and raise ``ValueError``. No-op when
        ``problem`` is None."""
        if problem is None:
            return
        h, m = st.header, st.next_msg
        sending = isinstance(st, Departure)
        if sending:
            self.cancel()
        else:
            self._drain_current()
        raise ValueError(
            f"{'sending' if sending else 'receiving'} transfer {h.transfer_id}, "
            f"{_what(h, m)}: {problem}; the transfer was {'cancelled' if sending else 'drained'}"
        )

    def _check_geometry(self, h: TransferHeader) -> None:
        if h.num_layers != self.spec.num_layers:
            raise ChannelError(
                f"transfer {h.transfer_id}: num_layers {h.num_layers}, channel has "
                f"{self.spec.num_layers}"
            )
        want = self.spec.layer_bytes(h.num_blocks)
        if h.bytes_per_layer != want:
            raise ChannelError(
                f"transfer {h.transfer_id}: bytes_per_layer {h.bytes_per_layer}, but "
                f"{h.num_blocks} blocks take {want}"
            )

    def _message_problem(self, t: Tensor, h: TransferHeader, m: int) -> str | None:
        shape = (len(h.message_layers(m)), *self.spec.layer_shape(h.num_blocks))
        if tuple(t.shape) != shape:
            return f"shape {list(t.shape)}, expected {list(shape)}"
        if t.dtype != self.spec.torch_dtype:
            return f"dtype {_dtype_name(t.dtype)}, expected {self.spec.dtype}"
        if t.device != self.device:
            return f"device {t.device}, expected {self.device}"
        if not t.is_contiguous():
            return "not contiguous"
        return None

    def _pool_problem(self, caches: Tensor, block_ids: Tensor, h: TransferHeader,
                      m: int) -> str | None:
        s = self.spec
        k = len(h.message_layers(m))
        if (caches.dim() != 6 or caches.shape[0] != k or caches.shape[1] != 2
                or tuple(caches.shape[3:]) != (s.block_size, s.num_kv_heads, s.head_dim)):
            return (f"pool layers of shape {list(caches.shape)}, expected "
                    f"[{k}, 2, N, {s.block_size}, {s.num_kv_heads}, {s.head_dim}]")
        if caches.dtype != s.torch_dtype:
            return f"pool dtype {_dtype_name(caches.dtype)}, expected {s.dtype}"
        if caches.device != self.device or block_ids.device != self.device:
            return f"pool on {caches.device}, block ids on {block_ids.device}, expected " \
                   f"{self.device}"
        if not _blocks_contiguous(caches):
            return "pool blocks are not contiguous"
        if block_ids.dtype != torch.int64 or tuple(block_ids.shape) != (h.num_blocks,):
            return (f"block ids {_dtype_name(block_ids.dtype)}{list(block_ids.shape)}, "
                    f"expected int64[{h.num_blocks}]")
        return None

    def _word_offset(self, h: TransferHeader, m: int) -> int:
        """Position of message ``m``'s first 32-bit word in the transfer's payload."""
        return h.message_layers(m).start * h.bytes_per_layer // 4

    def _side_stream(self) -> contextlib.AbstractContextManager[Any]:
        """Run on the channel's CUDA stream, after the caller's queued work (no-op on CPU)."""
        if self._stream is None:
            return contextlib.nullcontext()
        current = torch.cuda.current_stream(self.device)
        if current == self._stream:  # already on it
            return contextlib.nullcontext()
        self._stream.wait_stream(current)
        self._caller_reads = False
        return torch.cuda.stream(self._stream)

    def _on_stream(self) -> contextlib.AbstractContextManager[Any]:
        """Run on the channel's CUDA stream, ordered after its own work only: for buffers
        nobody but the channel touches (no-op on CPU)."""
        if self._stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._stream)

    def _join_side_stream(self) -> None:
        """Order the caller's later work on its current stream after the channel's."""
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def _staging(self, slot: int, h: TransferHeader, m: int) -> Tensor:
        """Staging buffer ``slot`` as message ``m``'s ``[k_m, 2, n, ...]`` tensor;
        grown when a transfer needs more (never shrunk: the next transfer reuses it)."""
        k = len(h.message_layers(m))
        view = self._views.get((slot, k, h.num_blocks))
        if view is not None:
            return view
        if any(key[2] != h.num_blocks for key in self._views):  # a new transfer's geometry
            self._views = {}
        nbytes = k * h.bytes_per_layer
        buf = self._slots[slot]
        if buf is None or buf.numel() < nbytes:
            with self._on_stream():
                size = max(h.layers_per_message * h.bytes_per_layer, 1)
                buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            self._slots[slot] = buf
            self._views = {key: v for key, v in self._views.items() if key[0] != slot}
        shape = (k, *self.spec.layer_shape(h.num_blocks))
        view = self._views[slot, k, h.num_blocks] = \
            buf[:nbytes].view(self.spec.torch_dtype).view(shape)
        return view

    def _tx_staging(self, h: TransferHeader, m: int) -> Tensor:
        """The sender's staging buffer for message ``m``; the send that last read it must
        have left first (a stream wait on CUDA, no host sync)."""
        slot = m % self.staging_slots
        last, self._slot_work[slot] = self._slot_work[slot], None
        if last is not None and not last.done:  # perhaps a departing transfer's send
            if self._is_cuda:
                with self._side_stream():
                    last.work.wait()
            else:
                self._wait_pending(last, time.monotonic() + self.timeout_s, "a previous send")
        return self._staging(slot, h, m)

    def _send_next(self, tx: Departure, t: Tensor, slot: int | None) -> None:
        """Post message ``tx.next_msg`` from ``t`` (staging buffer ``slot``, if one)."""
        h, m = tx.header, tx.next_msg
        sent = self._send_hook(m, t) if self._send_hook is not None else t
        tx.next_msg += 1
        if h.bytes_per_layer:
            self._post_send(tx, sent.reshape(-1).view(torch.uint8), _TAG_LAYER0 + m,
                            f"sending {_what(h, m)}")
            if slot is not None:
                self._slot_work[slot] = tx.pending[-1]

    def _post_send(self, tx: Departure, t: Tensor, tag: int, what: str) -> None:
        try:
            with self._side_stream():
                work = self._pg.send([t], self._peer, tag)
        except Exception as e:
            raise self._broken(f"{what} failed", e) from e
        tx.pending.append(_Pending(work, t))

    def _send_trailer(self, tx: Departure, status: int, first_token: int = -1) -> None:
        """Post ``tx``'s trailer from the next buffer of the ring; the running checksum is
        zeroed behind it, ready for the next transfer."""
        h = tx.header
        i = self._trailer_next
        self._trailer_next = (i + 1) % _TRAILER_RING
        last = self._trailer_work[i]
        if last is not None:  # its host words were copied before that send, too
            self._wait_pending(last, time.monotonic() + self.timeout_s, "an earlier trailer")
        words = self._trailer_np[i]
        words[:] = 0
        words[_T_FIRST_TOKEN] = first_token
        words[_T_MAGIC] = TRAILER_MAGIC
        words[_T_VERSION] = PROTOCOL_VERSION
        words[_T_TRANSFER_ID] = h.transfer_id
        words[_T_EPOCH] = h.epoch
        words[_T_STATUS] = status
        t = self._trailer_dev[i]
        with self._side_stream():
            if self._is_cuda:  # no host sync: the copy waits for the packs, not the host
                t.copy_(self._trailer_host[i], non_blocking=True)
            t[_T_CHECKSUM].copy_(self._send_sum)  # stays on the device
            self._send_sum.zero_()
        self._post_send(tx, t, _TAG_TRAILER, "sending the trailer")
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
        deadline = time.monotonic() + self.timeout_s
        for p in tx.pending:
            self._wait_pending(p, deadline, f"transfer {tx.header.transfer_id}")
        with self._state_lock:
            if tx.finished:
                return
            tx.finished = True
            tx.pending = []
            self._leaving = [d for d in self._leaving if d is not tx]
            if ok:
                self._record_stats(tx.header, tx.started)

    def _wait_pending(self, p: _Pending, deadline: float, what: str) -> None:
        """:meth:`_wait` for ``p``'s work, once (whichever thread comes first waits)."""
        with p.lock:
            if not p.done:
                self._wait(p.work, deadline, what)
                p.done = True

    def _take_message(self, rx: _RxState, out: Tensor | None) -> Tensor:
        """Message ``rx.next_msg`` in ``out`` or a staging buffer, ordered before the
        channel stream's later work. Into staging, the next messages' receives are posted
        first (one per other buffer), so they flow while this one is consumed."""
        h, m = rx.header, rx.next_msg
        rx.next_msg += 1
        if not h.bytes_per_layer:
            return out if out is not None else self._staging(m % self.staging_slots, h, m)
        if m not in rx.posted and out is not None:
            self._post_recv(rx, m, out, owned=False)
        elif m not in rx.posted:
            self._post_recv(rx, m, self._staging(m % self.staging_slots, h, m))
        if out is None:  # every other staging buffer: the next messages' receives
            self._post_ahead(rx, self.staging_slots - 1)
        buf, work = rx.posted.pop(m)
        if self._is_cuda:
            with self._side_stream():
                work.wait()  # the channel's stream waits for the NCCL stream; no host sync
            rx.pending.append(_Pending(work, buf))
        else:
            self._wait(work, time.monotonic() + self.timeout_s, f"receiving {_what(h, m)}")
        if out is not None and buf is not out:  # posted ahead into staging
            with self._side_stream():
                out.copy_(buf)
            return out
        return buf

    def _post_ahead(self, rx: _RxState, free: int) -> None:
        """Post the receives of messages ``rx.next_msg`` on into the ``free`` staging buffers
        no message handed out still uses (in order: NCCL matches receives to sends by
        order), and the trailer's once every message's receive is out, unless another
        transfer's trailer may still land in the verify buffer (``rx`` was started during
        that one's verify: its trailer receive waits until it is handed out). On CUDA a
        receive into a buffer is ordered after the unpack queued from it earlier; on CPU
        that unpack already ran."""
        h = rx.header
        if not h.bytes_per_layer:
            return
        first = rx.next_msg
        for m in range(first, min(first + free, h.num_messages)):
            if m not in rx.posted:
                self._post_recv(rx, m, self._staging(m % self.staging_slots, h, m))
        if (rx.trailer is None and h.num_messages - 1 in rx.posted
                and self._rx in (None, rx)):
            rx.trailer = self._post_trailer_recv()

    def _post_recv(self, rx: _RxState, m: int, buf: Tensor, owned: bool = True) -> None:
        """Post message ``m``'s receive into ``buf``: a staging buffer (``owned``), ordered
        after the channel stream's earlier unpacks from it and, when one was handed out, the
        caller's reads; or the caller's tensor, ordered after the caller's queued work."""
        try:
            with self._side_stream() if self._caller_reads or not owned else self._on_stream():
                if not owned and self._stream is not None:
                    buf.record_stream(self._stream)
                work = self._pg.recv([buf.reshape(-1).view(torch.uint8)], self._peer,
                                     _TAG_LAYER0 + m)
        except Exception as e:
            raise self._broken(f"receiving {_what(rx.header, m)} failed", e) from e
        rx.posted[m] = (buf, work)

    def _post_trailer_recv(self) -> Any:
        """Post the trailer's receive into the verify buffer; returns its Work. (The
        previous verify read that buffer with a host sync, so nothing reads it now.)"""
        try:
            with self._on_stream():
                return self._pg.recv([self._verify_words[:TRAILER_SLOTS]], self._peer,
                                     _TAG_TRAILER)
        except Exception as e:
            raise self._broken("receiving the trailer failed", e) from e

    def _recv_trailer(self, rx: _RxState) -> tuple[int, int, int, int]:
        """Wait for the rest of the transfer; returns the trailer's status, checksum and
        first token, and the checksum of what was received."""
        h = rx.header
        if rx.trailer is None:
            rx.trailer = self._post_trailer_recv()
        self._prefetch_next()
        deadline = time.monotonic() + self.timeout_s
        # Messages land in order: sleep through all but the last, then spin (for a bounded
        # time, looking for the next transfer's header) until the trailer is in, so the end
        # is seen within microseconds.
        for p in rx.pending[:-1]:
            self._wait(p.work, deadline, f"receiving transfer {h.transfer_id}")
        with self._side_stream():
            self._wait(rx.trailer, deadline, "receiving the trailer", spin_s=_VERIFY_SPIN_S,
                       on_spin=self._prefetch_next)
        for p in rx.pending[-1:]:
            self._wait(p.work, deadline, f"receiving transfer {h.transfer_id}")
        rx.pending.clear()
        with self._side_stream():  # after the last unpack: one copy for trailer and checksum
            v = [int(x) for x in self._verify_words.tolist()]
        if (v[_T_MAGIC] != TRAILER_MAGIC or v[_T_VERSION] != PROTOCOL_VERSION
                or v[_T_TRANSFER_ID] != h.transfer_id or v[_T_EPOCH] != h.epoch
                or v[_T_STATUS] not in (STATUS_OK, STATUS_CANCELLED)):
            raise self._fail(f"garbled trailer for transfer {h.transfer_id}: {v[:6]}")
        got, self._rx_base = (v[TRAILER_SLOTS] - self._rx_base) & _U64, v[TRAILER_SLOTS]
        return v[_T_STATUS], v[_T_CHECKSUM], v[_T_FIRST_TOKEN], got

    def _drain_current(self) -> None:
        """Receive (and drop) whatever is left of the current transfer, trailer included."""
        rx = self._rx
        if rx is None:
            return
        self._check_open()
        h = rx.header
        while rx.next_msg < h.num_messages:
            self._take_message(rx, None)
        self._recv_trailer(rx)
        self._rx = None
        logger.info("KV channel %r: transfer %d drained", self.name, h.transfer_id)

    def _wait(self, work: Any, deadline: float, what: str, spin_s: float = 0.0,
              on_spin: Callable[[], None] | None = None) -> None:
        """Wait for ``work`` until ``deadline``; on failure abort the channel and raise.
        CUDA: spin for up to ``spin_s`` first (the GIL is let go between polls, and
        ``on_spin`` runs), then poll with short sleeps (each oversleeps by tens of
        microseconds); past :data:`_PEER_CHECK_S`, also watch the doorbell connection for
        a peer that went away (the wait then ends within :data:`_PEER_GONE_GRACE_S`)."""
        gone: DoorbellError | None = None
        try:
            if self._is_cuda:
                # Poll: the NCCL work's CUDA event tells when the GPU finished; our deadline
                # fires (and aborts the communicator) well before the watchdog would.
                delay = 10e-6
                start = time.monotonic()
                spin_until, check_at = start + spin_s, start + _PEER_CHECK_S
                while not work.is_completed():
                    now = time.monotonic()
                    if now >= deadline:
                        raise gone or TimeoutError(f"timed out after {self.timeout_s:.3g} s")
                    if gone is None and now >= check_at:
                        check_at = now + _PEER_CHECK_S
                        gone = self._peer_gone()
                        if gone is not None:
                            deadline = min(deadline, now + _PEER_GONE_GRACE_S)
                    if now < spin_until:
                        if on_spin is not None:
                            on_spin()
                        time.sleep(0)
                        continue
                    time.sleep(delay)
                    delay = min(delay * 2, 50e-6)
                work.wait()  # orders the current stream after the NCCL stream; raises errors
            else:
                remaining = max(deadline - time.monotonic(), 1e-3)
                work.wait(timedelta(seconds=remaining))
        except Exception as e:
            raise self._broken(what, e, gone) from e

    def _broken(self, what: str, e: BaseException, gone: DoorbellError | None = None
                ) -> ChannelClosed:
        """:meth:`_fail` for ``what`` having failed with ``e``, with the reason the doorbell
        connection gives when it has one: a peer that left on purpose makes Gloo fail with
        a closed connection, for one, and is news, not a warning."""
        reason = gone or self._peer_gone() or e
        return self._fail(f"{what}: {reason}", quiet=isinstance(reason, PeerLeft))

    def _peer_gone(self) -> DoorbellError | None:
        """What the doorbell connection says about a peer that went away, if it did (None
        also once this end is closed: its own doorbell is then shut)."""
        if self._closed_reason is not None:
            return None
        role = _ROLE[self._peer]
        try:
            self._bell.check_peer()
        except PeerLeft:
            return PeerLeft(f"the {role} end closed the channel")
        except DoorbellError as e:
            return DoorbellError(f"the {role} end is gone ({e})")
        return None

    def _fail(self, reason: str, quiet: bool = False) -> ChannelClosed:
        """Mark the channel broken, abort the process group, and return the error to raise
        (logged as a warning; ``quiet``: as news, for a peer that left on purpose)."""
        if self._closed_reason is None:
            self._closed_reason = reason
            log = logger.info if quiet else logger.warning
            log("KV channel %r %s: %s", self.name, "closed" if quiet else "broken", reason)
        self.close()
        return ChannelClosed(f"KV channel {self.name!r}: {reason}")

    def _record_stats(self, h: TransferHeader, started: float) -> None:
        self.last_transfer_seconds = time.perf_counter() - started
        self.last_transfer_bytes = h.payload_bytes
        self.total_transfers += 1
        self.total_bytes += h.payload_bytes


def _what(h: TransferHeader, m: int) -> str:
    """``"layer 3"`` or ``"layers 4-7"``: what message ``m`` carries, for errors."""
    layers = h.message_layers(m)
    if len(layers) == 1:
        return f"layer {layers.start}"
    return f"layers {layers.start}-{layers.stop - 1}"


def _blocks_contiguous(caches: Tensor) -> bool:
    """Each block's ``[bs, Hk, D]`` of ``caches [k, 2, N, bs, Hk, D]`` is one contiguous run
    (from the strides alone: no view is made)."""
    run = 1
    for size, stride in zip(reversed(caches.shape[3:]), reversed(caches.stride()[3:]),
                            strict=True):
        if size != 1 and stride != run:
            return False
        run *= size
    return True


def _pack(caches: Tensor, block_ids: Tensor, out: Tensor, word_offset: int,
          acc: Tensor) -> None:
    """Fused pack + checksum share added to ``acc`` (Triton on a GPU, the torch reference
    elsewhere). The channel checked the arguments (``_pool_problem``)."""
    if out.is_cuda:
        kv_pack.pack_kv_checksum(caches, block_ids, out, word_offset, acc, check=False)
    else:
        kv_pack.pack_kv_checksum_ref(caches, block_ids, out, word_offset, acc)


def _unpack(buf: Tensor, caches: Tensor, block_ids: Tensor, word_offset: int,
            acc: Tensor) -> None:
    """Fused unpack + checksum share added to ``acc`` (see :func:`_pack`)."""
    if buf.is_cuda:
        kv_pack.unpack_kv_checksum(buf, caches, block_ids, word_offset, acc,
                                           check=False)
    else:
        kv_pack.unpack_kv_checksum_ref(buf, caches, block_ids, word_offset, acc)


# --------------------------------------------------------------------------------------
# Construction helpers
# --------------------------------------------------------------------------------------


def _private_client(store: dist.Store, timeout: timedelta) -> dist.Store:
    """A connection of the channel's own to ``store``.

    A TCPStore client serializes its operations, so a channel blocked in a store wait
    (handshake, rendezvous) would stall every other channel sharing the connection; each
    channel therefore gets its own. Its default timeout (which bounds the process group's
    rendezvous) is the channel's, and the caller's store is left untouched. Other store
    types are used as they are."""
    if not isinstance(store, dist.TCPStore):
        return store
    clone = getattr(store, "clone", None)
    client: dist.TCPStore
    if clone is not None:
        client = clone()
    else:  # older torch
        client = dist.TCPStore(store.host, store.port, None, False, timeout,
                               wait_for_workers=False)
    client.set_timeout(timeout)
    return client


def _listen_host(store: dist.Store) -> str:
    """Where the decode end's doorbell listens: the interface its store serves on."""
    return str(store.host) if isinstance(store, dist.TCPStore) else "127.0.0.1"


def _handshake(ns: dist.Store, *, name: str, rank: int, spec: ChannelSpec,
               timeout_s: float) -> None:
    my_key, peer_key = f"spec/{rank}", f"spec/{1 - rank}"
    try:
        if ns.check([my_key]):
            raise ChannelError(
                f"KV channel name {name!r} was already used on this store (its "
                f"{_ROLE[rank]} end exists); use a fresh name for every pairing"
            )
        ns.set(my_key, spec.to_json())
        ns.wait([peer_key], timedelta(seconds=timeout_s))
        raw = ns.get(peer_key)
    except ChannelError:
        raise
    except dist.DistStoreError as e:
        raise ChannelError(
            f"KV channel {name!r}: the {_ROLE[1 - rank]} side did not join within "
            f"{timeout_s:.3g} s"
        ) from e
    except Exception as e:
        raise ChannelError(f"KV channel {name!r}: store failure in the handshake: {e}") from e
    try:
        peer = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise HandshakeError(f"KV channel {name!r}: the peer's spec is not JSON") from e
    if not isinstance(peer, dict):
        raise HandshakeError(f"KV channel {name!r}: the peer's spec is not a JSON object")
    mine = dataclasses.asdict(spec)
    diffs = spec_differences(*((mine, peer) if rank == 0 else (peer, mine)))
    if diffs:
        raise HandshakeError(
            f"KV channel {name!r}: prefill and decode disagree: " + "; ".join(diffs)
        )


def _make_gloo(store: dist.Store, rank: int, timeout: timedelta, host: str | None) -> Any:
    if host is None:
        return dist.ProcessGroupGloo(store, rank, 2, timeout)
    gloo_cls: Any = dist.ProcessGroupGloo  # the options type is not in the stubs
    opts = gloo_cls._Options()
    opts._timeout = timeout
    opts._devices = [gloo_cls.create_device(hostname=host)]
    return gloo_cls(store, rank, 2, opts)


def _make_nccl(store: dist.Store, rank: int, device: torch.device, timeout_s: float,
               name: str) -> Any:
    nccl_cls: Any = getattr(dist, "ProcessGroupNCCL", None)
    if nccl_cls is None or not dist.is_nccl_available():
        raise ChannelError("this torch build has no NCCL")
    # Without this the watchdog tears the whole worker down on a timeout; we want only the
    # communicator aborted (our own deadlines normally abort first anyway).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    # One transfer at a time per channel by design, so P2P serialization is what we want.
    os.environ.setdefault("TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING", "false")
    # The flight recorder records every NCCL operation with its stack, host time on each
    # message's path; the channel's own deadlines name what hung. (Read once per process,
    # when the first NCCL group is built: the workers' first groups are their channels.)
    for var in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"):
        os.environ.setdefault(var, "0")
    opts = nccl_cls.Options()
    opts._timeout = timedelta(seconds=max(3 * timeout_s, timeout_s + 60))
    opts.is_high_priority_stream = False
    with contextlib.suppress(AttributeError, TypeError):
        opts.group_name = f"pdserve-kv-{name}"
    with torch.cuda.device(device):
        pg = nccl_cls(store, rank, 2, opts)
        # Bind the device and build the communicator now (both sides rendezvous here), so the
        # first transfer does not pay for it and p2p reuses this communicator.
        pg.eager_connect_single_device(device)
    return pg


__all__ = [
    "HEADER_SLOTS",
    "KV_LAYOUT",
    "PROTOCOL_VERSION",
    "ChannelClosed",
    "ChannelError",
    "ChannelSpec",
    "Departure",
    "HandshakeError",
    "KVChannel",
    "TransferError",
    "TransferHeader",
    "TransferTimeout",
    "kv_checksum",
    "match_header",
    "spec_differences",
]
