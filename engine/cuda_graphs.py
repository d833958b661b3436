"""CUDA graphs of the decode step at a ladder of batch sizes (nano-vllm style).

One graph per batch size in the ladder, all captured into one shared memory pool (largest
first, so that the smaller ones reuse its activations). Each graph reads fixed device
buffers: a flat int64 ``inputs`` holding token ids, positions, slots and KV lengths, and a
block table of a fixed width. A step of ``n`` sequences copies its inputs into those
buffers, replays the graph of the smallest captured size ``b >= n``, and reads the first
``n`` rows of the float32 logits that the graph wrote (computed inside the graph too).

Rows ``n .. b-1`` are padding: token 0 at position 0, slot -1 (``store_kv`` skips it, so no
KV is written) and KV length 1 (attention reads one finite cached key: no empty softmax,
no NaN).

The decode split count is fixed per captured size, planned for the longest context the
block table can hold, so one graph is valid for any context (the kernel's splits past a
sequence's end are empty and merge to nothing).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Protocol

import torch

from pdserve.engine.model import BatchMeta, LlamaModel
from pdserve.kernels.attention_decode import plan_decode_splits

LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64)


class DecodeInput(Protocol):
    """What a decode step needs of one sequence (``engine.runner.DecodeItem``)."""

    @property
    def token(self) -> int: ...
    @property
    def position(self) -> int: ...
    @property
    def block_ids(self) -> Sequence[int]: ...


def graph_batch_sizes(max_num_seqs: int, cap: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, then every 32, up to ``min(max_num_seqs, cap)``; the
    limit itself is always the last size, so every batch up to it has a graph."""
    limit = min(max_num_seqs, cap)
    if limit < 1:
        return []
    sizes = [b for b in LADDER if b < limit]
    sizes += range(LADDER[-1] + 32, limit, 32)
    sizes.append(limit)
    return sizes


def pack_decode_inputs(items: Sequence[DecodeInput], size: int, block_size: int) -> list[int]:
    """The flat ``[ids | positions | slots | kv_lens]`` of a graph of ``size`` rows: ``4 *
    size`` ints, the ``len(items)`` real rows first in each part, then padding rows (token 0,
    position 0, slot -1, KV length 1)."""
    pad = size - len(items)
    ids = [it.token for it in items]
    pos = [it.position for it in items]
    slots = [it.block_ids[p // block_size] * block_size + p % block_size
             for it, p in zip(items, pos, strict=True)]
    lens = [p + 1 for p in pos]
    fill0 = [0] * pad
    return ids + fill0 + pos + fill0 + slots + [-1] * pad + lens + [1] * pad


def pack_block_table(items: Sequence[DecodeInput], block_size: int) -> tuple[list[int], int]:
    """Row-major ``[len(items), width]`` block ids, ``width`` the most blocks any sequence's
    KV length needs (blocks a sequence holds past its length are not read); short rows are
    padded with block 0."""
    need = [(it.position + block_size) // block_size for it in items]
    width = max(need)
    flat: list[int] = []
    for it, n in zip(items, need, strict=True):
        flat.extend(it.block_ids[:n])
        if n < width:
            flat.extend([0] * (width - n))
    return flat, width


class DecodeGraphs:
    """The decode step as CUDA graphs over fixed input buffers.

    ``capture=False`` keeps the same buffers and padding but runs the step eagerly on each
    call (no CUDA needed): the CPU tests check the buffer logic that way.
    """

    def __init__(
        self,
        model: LlamaModel,
        kv_pool: torch.Tensor,
        block_size: int,
        sizes: Sequence[int],
        max_blocks_per_seq: int,
    ) -> None:
        if not sizes:
            raise ValueError("no batch sizes to capture")
        self.model = model
        self.kv_pool = kv_pool
        self.block_size = block_size
        self.sizes = sorted(set(sizes))
        self.max_batch = self.sizes[-1]
        self.max_blocks = max_blocks_per_seq
        dev = model.device
        self.device = dev
        self._pin = dev.type == "cuda"
        bmax, width = self.max_batch, max_blocks_per_seq
        self.inputs = torch.zeros(4 * bmax, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(bmax, width, dtype=torch.int32, device=dev)
        self._table_stage = torch.zeros(bmax * width, dtype=torch.int32, device=dev)
        self.logits = torch.zeros(bmax, model.config.vocab_size, dtype=torch.float32, device=dev)
        num_sms = (torch.cuda.get_device_properties(dev).multi_processor_count
                   if dev.type == "cuda" else 4)
        max_ctx = width * block_size
        self.num_splits = {
            b: plan_decode_splits(b, model.config.num_kv_heads, max_ctx, num_sms)
            for b in self.sizes
        }
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def fits(self, items: Sequence[DecodeInput]) -> bool:
        """Whether a captured size holds this batch and the table is wide enough for it."""
        return (0 < len(items) <= self.max_batch and
                all(it.position < self.max_blocks * self.block_size for it in items))

    def size_for(self, n: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, n)]

    def _step(self, b: int) -> None:
        """The captured body: the decoder and the logits of ``b`` rows of the fixed buffers."""
        inp = self.inputs
        meta = BatchMeta(
            is_prefill=False,
            positions=inp[b : 2 * b],
            slot_mapping=inp[2 * b : 3 * b],
            block_tables=self.block_tables[:b],
            kv_lens=inp[3 * b : 4 * b].to(torch.int32),
            num_splits=self.num_splits[b],
        )
        hidden = self.model.forward(inp[:b], meta, self.kv_pool)
        self.model.logits(hidden, out=self.logits[:b])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, into one shared memory pool. Each size runs
        once eagerly first (JIT-compiles its kernels, picks its GEMM algorithms)."""
        pool = None
        for b in reversed(self.sizes):
            self.inputs[: 4 * b].copy_(torch.tensor(pack_decode_inputs([], b, self.block_size)))
            self._step(b)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._step(b)
            if pool is None:
                pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def run(self, items: Sequence[DecodeInput]) -> torch.Tensor:
        """One decode step; returns float32 logits ``[len(items), V]``: a view of the fixed
        output buffer, valid until the next step."""
        n = len(items)
        b = self.size_for(n)
        host = torch.tensor(pack_decode_inputs(items, b, self.block_size), dtype=torch.int64,
                            pin_memory=self._pin)
        self.inputs[: 4 * b].copy_(host, non_blocking=True)
        flat, width = pack_block_table(items, self.block_size)
        table = torch.tensor(flat, dtype=torch.int32, pin_memory=self._pin)
        stage = self._table_stage[: n * width]
        stage.copy_(table, non_blocking=True)
        # Only the columns in use; stale columns past them are never read (masked by kv_len),
        # and stale padding rows hold valid block ids from earlier steps (or 0).
        self.block_tables[:n, :width].copy_(stage.view(n, width))
        graph = self.graphs.get(b)
        if graph is not None:
            graph.replay()
        else:
            self._step(b)
        return self.logits[:n]
