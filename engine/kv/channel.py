"""What both ends of a KV channel share (:mod:`engine.kv`): :class:`ChannelEnd`, the part of a
:class:`~engine.kv.sender.KVSender` or :class:`~engine.kv.receiver.KVReceiver` that holds the
process group, the doorbell, the CUDA stream, the staging buffers, the waits and the failure
handling.

Failures: a truly broken channel (a send/receive timed out, the peer died, a garbled header or
trailer) is aborted and marked closed (:meth:`ChannelEnd.fail`); every later call raises
:class:`ChannelClosed` and the owner opens a fresh channel under a new name. A peer that went
away shows on the doorbell connection: as a goodbye when it closed its end on purpose (logged
as news), as a closed connection when its process is gone (logged as a warning).

NCCL notes (untested on CPU-only machines; DESIGN.md section 10 reports the channel shape
working between two Ray actors): all channel work runs on a dedicated CUDA stream that first
waits on the caller's current stream, and received data is ordered before the caller's later
work on its current stream. Every blocking wait polls with the channel's own deadline and
calls ``abort()`` on expiry; the NCCL watchdog timeout is set well above it as a backstop
(:func:`engine.kv.connect.make_nccl_group`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pdserve.engine.kv.doorbell import Doorbell, DoorbellError, PeerLeft
from pdserve.engine.kv.protocol import (
    ChannelClosed,
    ChannelError,
    ChannelSpec,
    TransferHeader,
    dtype_name,
)

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode")  # by rank
STAGING_SLOTS = 2  # default number of staging buffers (see ChannelEnd.set_staging_slots)
# A wait on NCCL work longer than this looks at the doorbell connection every as often: a
# peer that aborted its communicator (a broken or closed channel) never completes its side,
# and its closed connection says so (the CPU backend, Gloo, raises on its own).
_PEER_CHECK_S = 5e-3
# Once the peer is seen gone, work still waited for gets this long to complete (what the peer
# sent before it went may still be landing) before the channel gives up.
_PEER_GONE_GRACE_S = 0.5


@dataclass(eq=False)
class Pending:
    """A send or receive posted on the process group."""

    work: Any  # torch.distributed Work
    tensor: Tensor  # kept alive until the work completed
    # A Gloo work may be waited for once only, and two threads may want to (the next
    # transfer reusing a staging buffer, and wait_finished): the first one waits.
    done: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class TransferStats:
    """The last completed transfer's time and size, and how many completed, for metrics."""

    last_seconds: float = 0.0
    last_bytes: int = 0
    transfers: int = 0

    def record(self, h: TransferHeader, started: float) -> None:
        """``h``'s transfer, started at ``started`` (``time.perf_counter()``), completed."""
        self.last_seconds = time.perf_counter() - started
        self.last_bytes = h.payload_bytes
        self.transfers += 1


@dataclass(eq=False)
class Link:
    """The parts of a channel end that the rendezvous (:mod:`engine.kv.connect`) built."""

    name: str
    rank: int  # 0: the prefill end (it sends), 1: the decode end (it receives)
    spec: ChannelSpec
    device: torch.device
    timeout_s: float
    pg: Any  # ProcessGroupGloo or ProcessGroupNCCL of size 2
    namespace: dist.Store
    stores: list[dist.Store]  # kept alive (cloned / owned) until close
    bell: Doorbell


class ChannelEnd:
    """The shared part of one channel end; its role (sender or receiver) owns it.

    ``in_flight`` tells whether the role holds a transfer (closing then aborts the process
    group) and ``forget`` drops every transfer it holds; :meth:`close` calls both."""

    def __init__(self, link: Link, *, in_flight: Callable[[], bool],
                 forget: Callable[[], None]) -> None:
        self.name = link.name
        self.rank = link.rank
        self.spec = link.spec
        self.device = device = link.device
        self.timeout_s = link.timeout_s
        self.pg: Any = link.pg
        self.ns: dist.Store | None = link.namespace
        self.stores = link.stores
        self.peer = 1 - link.rank
        self.is_cuda = device.type == "cuda"
        self.stream: torch.cuda.Stream | None = (
            torch.cuda.Stream(device=device) if self.is_cuda else None
        )
        self.bell = link.bell
        self.closed_reason: str | None = None
        self._in_flight = in_flight
        self._forget = forget
        # Serializes close(): the receive thread (a dead peer) and worker shutdown may
        # close at once, and the second caller must return only once teardown is done.
        self._close_lock = threading.Lock()
        # Staging buffers used in turn by message (pack or receive the next ones while m
        # moves), and on the sender the send that last read each one.
        self.staging_slots = STAGING_SLOTS
        self.slots: list[Tensor | None] = [None] * self.staging_slots
        self.slot_work: list[Pending | None] = [None] * self.staging_slots
        # A staging buffer was handed to the caller (recv_message), who may still read it on
        # its stream: the next receive into staging waits for that stream first.
        self.caller_reads = False
        # Staging views by (slot, layers, blocks): each message's view is built once.
        self.views: dict[tuple[int, int, int], Tensor] = {}

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    def set_staging_slots(self, n: int, busy: bool) -> None:
        """Use ``n`` (at least 2) staging buffers in turn; only while not ``busy``."""
        if n < 2:
            raise ValueError(f"staging_slots must be at least 2, got {n}")
        if busy:
            raise ChannelError("set_staging_slots during a transfer")
        self.staging_slots = n
        self.slots = [None] * n
        self.slot_work = [None] * n
        self.views = {}

    def close(self, abort: bool = False) -> None:
        """Tear down the process group (abort if broken, mid-transfer or ``abort``, else shut
        down), close the doorbell (a receiver waiting on it returns at once) and release the
        stores. Idempotent and thread-safe: a caller racing another close returns once that
        teardown is done. A clean NCCL shutdown waits until the peer tears its end down too;
        ``abort`` never waits for the peer (worker shutdown)."""
        with self._close_lock:
            if self.pg is None:
                return
            pg, self.pg = self.pg, None
            broken = abort or self.closed_reason is not None or self._in_flight()
            # An end closing a sound channel says goodbye: the other end then knows the peer
            # left (shutdown) rather than died.
            goodbye = self.closed_reason is None
            if self.closed_reason is None:
                self.closed_reason = "closed"
            self._forget()
            self.bell.close(goodbye=goodbye)
            try:
                if broken:
                    pg.abort()
                else:
                    pg.shutdown()
            except Exception as e:  # teardown is best effort
                logger.warning("KV channel %r: teardown: %s", self.name, e)
            del pg
            self.ns = None
            self.stores = []
            self.slots = [None] * self.staging_slots
            self.slot_work = [None] * self.staging_slots
            self.views = {}

    # ---- checks ---------------------------------------------------------------------

    def check_open(self) -> None:
        if self.closed_reason is not None:
            raise ChannelClosed(f"KV channel {self.name!r} is closed: {self.closed_reason}")

    def check_geometry(self, h: TransferHeader) -> None:
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

    def message_problem(self, t: Tensor, h: TransferHeader, m: int) -> str | None:
        """What is wrong with ``t`` as message ``m`` of ``h``'s transfer, if anything."""
        shape = (len(h.message_layers(m)), *self.spec.layer_shape(h.num_blocks))
        if tuple(t.shape) != shape:
            return f"shape {list(t.shape)}, expected {list(shape)}"
        if t.dtype != self.spec.torch_dtype:
            return f"dtype {dtype_name(t.dtype)}, expected {self.spec.dtype}"
        if t.device != self.device:
            return f"device {t.device}, expected {self.device}"
        if not t.is_contiguous():
            return "not contiguous"
        return None

    def pool_problem(self, caches: Tensor, block_ids: Tensor, h: TransferHeader,
                     m: int) -> str | None:
        """What is wrong with ``caches`` and ``block_ids`` as message ``m``'s pool layers and
        blocks, if anything."""
        s = self.spec
        k = len(h.message_layers(m))
        if (caches.dim() != 6 or caches.shape[0] != k or caches.shape[1] != 2
                or tuple(caches.shape[3:]) != (s.block_size, s.num_kv_heads, s.head_dim)):
            return (f"pool layers of shape {list(caches.shape)}, expected "
                    f"[{k}, 2, N, {s.block_size}, {s.num_kv_heads}, {s.head_dim}]")
        if caches.dtype != s.torch_dtype:
            return f"pool dtype {dtype_name(caches.dtype)}, expected {s.dtype}"
        if caches.device != self.device or block_ids.device != self.device:
            return f"pool on {caches.device}, block ids on {block_ids.device}, expected " \
                   f"{self.device}"
        if not _blocks_contiguous(caches):
            return "pool blocks are not contiguous"
        if block_ids.dtype != torch.int64 or tuple(block_ids.shape) != (h.num_blocks,):
            return (f"block ids {dtype_name(block_ids.dtype)}{list(block_ids.shape)}, "
                    f"expected int64[{h.num_blocks}]")
        return None

    # ---- streams and staging --------------------------------------------------------

    def side_stream(self) -> contextlib.AbstractContextManager[Any]:
        """Run on the channel's CUDA stream, after the caller's queued work (no-op on CPU)."""
        if self.stream is None:
            return contextlib.nullcontext()
        current = torch.cuda.current_stream(self.device)
        if current == self.stream:  # already on it
            return contextlib.nullcontext()
        self.stream.wait_stream(current)
        self.caller_reads = False
        return torch.cuda.stream(self.stream)

    def on_stream(self) -> contextlib.AbstractContextManager[Any]:
        """Run on the channel's CUDA stream, ordered after its own work only: for buffers
        nobody but the channel touches (no-op on CPU)."""
        if self.stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.stream)

    def join_side_stream(self) -> None:
        """Order the caller's later work on its current stream after the channel's."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def staging(self, slot: int, h: TransferHeader, m: int) -> Tensor:
        """Staging buffer ``slot`` as message ``m``'s ``[k_m, 2, n, ...]`` tensor;
        grown when a transfer needs more (never shrunk: the next transfer reuses it)."""
        k = len(h.message_layers(m))
        view = self.views.get((slot, k, h.num_blocks))
        if view is not None:
            return view
        if any(key[2] != h.num_blocks for key in self.views):  # a new transfer's geometry
            self.views = {}
        nbytes = k * h.bytes_per_layer
        buf = self.slots[slot]
        if buf is None or buf.numel() < nbytes:
            with self.on_stream():
                size = max(h.layers_per_message * h.bytes_per_layer, 1)
                buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            self.slots[slot] = buf
            self.views = {key: v for key, v in self.views.items() if key[0] != slot}
        shape = (k, *self.spec.layer_shape(h.num_blocks))
        view = self.views[slot, k, h.num_blocks] = \
            buf[:nbytes].view(self.spec.torch_dtype).view(shape)
        return view

    # ---- waits and failures ---------------------------------------------------------

    def wait(self, work: Any, deadline: float, what: str, spin_s: float = 0.0,
             on_spin: Callable[[], None] | None = None) -> None:
        """Wait for ``work`` until ``deadline``; on failure abort the channel and raise.
        CUDA: spin for up to ``spin_s`` first (the GIL is let go between polls, and
        ``on_spin`` runs), then poll with short sleeps (each oversleeps by tens of
        microseconds); past :data:`_PEER_CHECK_S`, also watch the doorbell connection for
        a peer that went away (the wait then ends within :data:`_PEER_GONE_GRACE_S`)."""
        gone: DoorbellError | None = None
        try:
            if self.is_cuda:
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
                        gone = self.peer_gone()
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
            raise self.broken(what, e, gone) from e

    def wait_pending(self, p: Pending, deadline: float, what: str) -> None:
        """:meth:`wait` for ``p``'s work, once (whichever thread comes first waits)."""
        with p.lock:
            if not p.done:
                self.wait(p.work, deadline, what)
                p.done = True

    def broken(self, what: str, e: BaseException, gone: DoorbellError | None = None
               ) -> ChannelClosed:
        """:meth:`fail` for ``what`` having failed with ``e``, with the reason the doorbell
        connection gives when it has one: a peer that left on purpose makes Gloo fail with
        a closed connection, for one, and is news, not a warning."""
        reason = gone or self.peer_gone() or e
        return self.fail(f"{what}: {reason}", quiet=isinstance(reason, PeerLeft))

    def peer_gone(self) -> DoorbellError | None:
        """What the doorbell connection says about a peer that went away, if it did (None
        also once this end is closed: its own doorbell is then shut)."""
        if self.closed_reason is not None:
            return None
        role = ROLES[self.peer]
        try:
            self.bell.check_peer()
        except PeerLeft:
            return PeerLeft(f"the {role} end closed the channel")
        except DoorbellError as e:
            return DoorbellError(f"the {role} end is gone ({e})")
        return None

    def fail(self, reason: str, quiet: bool = False) -> ChannelClosed:
        """Mark the channel broken, abort the process group, and return the error to raise
        (logged as a warning; ``quiet``: as news, for a peer that left on purpose)."""
        if self.closed_reason is None:
            self.closed_reason = reason
            log = logger.info if quiet else logger.warning
            log("KV channel %r %s: %s", self.name, "closed" if quiet else "broken", reason)
        self.close()
        return ChannelClosed(f"KV channel {self.name!r}: {reason}")


def first_word(h: TransferHeader, m: int) -> int:
    """Position of message ``m``'s first 32-bit word in the transfer's payload."""
    return h.message_layers(m).start * h.bytes_per_layer // 4


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
