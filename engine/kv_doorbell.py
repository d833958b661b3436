"""The decode end's doorbell on a CUDA KV channel (protocol 4): the next transfer's header
receive, kept posted on the channel's NCCL communicator, and a thread that sleeps until it
lands.

Why not the store doorbell (protocol 3, still used on CPU): with it the decode side held the
header about 1.3 ms after the sender started on two H200s (the sender's ``set``, the store
server's notify, the receiver's ``get``, posting the first receives), a fixed cost per
transfer that held a whole 4k-token request's transfer to 0.62-0.69 of raw NCCL
(docs/benchmarks.md). A receive that is already posted moves the header the moment the
sender's send is queued, and the receives that follow queue behind it on the same NCCL
stream.

What it costs, and how it is contained:

* An NCCL receive kernel waits on the decode GPU while the channel is idle (a few thread
  blocks; ``cluster.bench_kv`` measures what that does to other kernels on that GPU).
* NCCL's watchdog would call a long-idle receive a hang and abort the communicator, so CUDA
  channels run with the watchdog timeout pushed out (``engine.kv_transfer``); every wait of
  the channel keeps its own deadline, as before.
* A posted receive cannot be withdrawn, so the decode end of a CUDA channel is always torn
  down with ``abort()``, which also ends the waiting kernel (and so this thread's wait).

The waiter sleeps in ``cudaEventSynchronize`` on an event created with
``cudaEventBlockingSync``: no CPU is spent while idle, and the GIL is released, so the
decode worker's step loop is not disturbed by polling. The header is copied to pinned host
memory behind the receive, before the event, so it is readable the moment the event fires.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from engine.kv_protocol import _TAG_HEADER, HEADER_SLOTS


@dataclass
class _Armed:
    device_buf: Tensor  # int64[HEADER_SLOTS] the receive writes
    host_buf: Tensor  # pinned copy, valid once ``landed`` is set
    work: Any  # the receive's torch.distributed Work
    landed: threading.Event


class NcclDoorbell:
    """The header receive of the next transfer, posted ahead (rank 1, CUDA only).

    ``arm`` posts it (once per transfer, right after the trailer's receive, so that NCCL's
    in-order matching lines it up with the sender's next header send); ``wait`` returns the
    header once it landed, or None when none came in time (the receive stays posted)."""

    def __init__(self, pg: Any, peer: int, device: torch.device, name: str) -> None:
        self._pg = pg
        self._peer = peer
        self._device = device
        # A stream of its own: waiting for the receive here holds up nothing else.
        self._stream = torch.cuda.Stream(device=device)
        self._armed: _Armed | None = None
        self._jobs: queue.SimpleQueue[tuple[torch.cuda.Event, threading.Event] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._watch, name=f"kv-bell-{name}",
                                        daemon=True)
        self._thread.start()

    @property
    def armed(self) -> bool:
        return self._armed is not None

    def arm(self) -> None:
        """Post the next header's receive (in order after everything posted so far)."""
        if self._armed is not None:
            raise RuntimeError("the doorbell is already armed")
        with torch.cuda.stream(self._stream):
            device_buf = torch.empty(HEADER_SLOTS, dtype=torch.int64, device=self._device)
            work = self._pg.recv([device_buf], self._peer, _TAG_HEADER)
            work.wait()  # this stream waits for the NCCL stream's receive (no host sync)
            host_buf = torch.empty(HEADER_SLOTS, dtype=torch.int64, pin_memory=True)
            host_buf.copy_(device_buf, non_blocking=True)
            event = torch.cuda.Event(blocking=True)
            event.record(self._stream)
        landed = threading.Event()
        self._armed = _Armed(device_buf, host_buf, work, landed)
        self._jobs.put((event, landed))

    def wait(self, timeout_s: float) -> Tensor | None:
        """The header as ``int64[HEADER_SLOTS]`` on the host once it landed (the doorbell is
        then disarmed), or None after ``timeout_s`` (it stays armed)."""
        armed = self._armed
        if armed is None:
            raise RuntimeError("the doorbell is not armed")
        if not armed.landed.wait(timeout_s):
            return None
        self._armed = None
        return armed.host_buf

    def stop(self) -> None:
        """End the waiter thread once its current wait ends (after the communicator was
        aborted, which ends the posted receive)."""
        self._jobs.put(None)

    def _watch(self) -> None:
        while (job := self._jobs.get()) is not None:
            event, landed = job
            try:
                event.synchronize()  # sleeps until the GPU signals; the GIL is released
            except Exception:  # a broken context: the channel's own checks report it
                pass
            finally:
                landed.set()
