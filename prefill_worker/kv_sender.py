"""One request's KV on its way out: header, one packed layer at a time, trailer.

Used two ways by the prefill worker: layer-wise during the forward pass (layer l leaves
while layer l+1 computes; on GPU the channel sends on its own stream), or in one go from
the send thread when the request's channel was busy with another transfer.
"""

from __future__ import annotations

import threading
import time

import torch

from engine.kv_transfer import KVChannel, TransferHeader
from kernels.ops import KernelOps
from prefill_worker.scheduler import PrefillSeq


class OutgoingKV:
    """Streams ``seq``'s blocks from ``pool`` [L, 2, N, bs, Hk, D] over ``channel``.

    The caller holds ``lock`` (the channel's: one transfer at a time per channel) from
    :meth:`start` until :meth:`finish` or :meth:`cancel` returns.
    """

    def __init__(self, seq: PrefillSeq, channel: KVChannel, lock: threading.Lock,
                 pool: torch.Tensor, ops: KernelOps) -> None:
        self.seq = seq
        self.channel = channel
        self.lock = lock
        self.pool = pool
        self.ops = ops
        self.ids = torch.tensor(seq.block_ids, dtype=torch.int64, device=pool.device)
        # One staging slice per layer: sends are asynchronous, so a layer's buffer stays
        # untouched until finish().
        self.staging = torch.empty((pool.shape[0], 2, len(seq.block_ids), *pool.shape[3:]),
                                   dtype=pool.dtype, device=pool.device)
        lease = seq.task.lease
        self.header = TransferHeader.for_spec(
            channel.spec, transfer_id=lease.transfer_id, epoch=lease.epoch,
            num_blocks=len(seq.block_ids), num_tokens=len(seq.task.token_ids),
        )
        self.started = 0.0
        self.error = ""  # set when a layer failed to go out; the rest is then skipped

    @property
    def nbytes(self) -> int:
        return self.header.payload_bytes

    def start(self) -> None:
        self.started = time.monotonic()
        self.channel.send_header(self.header)

    def send_layer(self, layer: int) -> None:
        self.ops.pack_kv(self.pool[layer], self.ids, self.staging[layer])
        self.channel.send_layer(self.staging[layer])

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
        for layer in range(self.pool.shape[0]):
            self.send_layer(layer)

    def finish(self, first_token: int) -> float:
        """Trailer (with the first token) out, wait until all left; returns seconds."""
        if self.error:
            raise RuntimeError(f"a layer failed to go out: {self.error}")
        self.channel.finish(first_token)
        return time.monotonic() - self.started

    def cancel(self) -> None:
        if not self.channel.closed:
            self.channel.cancel()
