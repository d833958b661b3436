"""Batch metadata and the forward pass of one worker: slot mapping, block tables,
cu_seqlens, logits, the decode CUDA graphs and the KV pool's size. Knows nothing of Ray or gRPC.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.config import (
    MAX_BATCH_TOKENS,
    MAX_NUM_SEQS,
    CacheConfig,
    ModelConfig,
    ModelSpec,
    RunnerConfig,
)
from pdserve.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from pdserve.engine.fingerprint import serving_fingerprint, tokenizer_digest, weights_digest
from pdserve.engine.kv_cache import allocate_kv_pool, kv_bytes_per_token
from pdserve.engine.model import BatchMeta, LayerHook, LlamaModel
from pdserve.engine.weights import load_weights
from pdserve.kernels.ops import get_ops

_FIXED_RESERVE = 512 << 20  # CUDA/cuBLAS workspaces, Triton launch state, allocator slack


@dataclass(frozen=True)
class PrefillItem:
    """One sequence's chunk in a prefill batch: ``token_ids`` sit at positions
    ``start .. start + len - 1``; the tokens before ``start`` are already cached."""

    token_ids: Sequence[int]
    start: int
    block_ids: Sequence[int]


@dataclass(frozen=True)
class DecodeItem:
    """One sequence in a decode step: its last token, at ``position``."""

    token: int
    position: int
    block_ids: Sequence[int]


def activation_reserve_bytes(
    config: ModelConfig, dtype: torch.dtype, max_batch_tokens: int, max_num_seqs: int,
    graph_batch: int,
) -> int:
    """GPU memory to keep free beside weights and KV: the live tensors of one layer for a
    ``max_batch_tokens`` prefill step (x, the float32 residual, normed, qkv, attention out,
    gate_up, SiLU product), twice for the caching allocator's fragmentation; the CUDA-graph
    pool (the same per token for ``graph_batch`` rows, plus their logits); the float32
    logits and sampler temporaries of ``max_num_seqs`` rows; and a fixed slack."""
    item = dtype.itemsize
    c = config
    # x and normed in the model's dtype, the float32 residual stream (in and out)
    per_token = (item * (2 * c.hidden_size + 2 * c.q_size + 2 * c.kv_size
                         + 3 * c.intermediate_size) + 4 * 2 * c.hidden_size)
    logits_row = c.vocab_size * (item + 4)
    prefill = 2 * max_batch_tokens * per_token
    graphs = graph_batch * (per_token + logits_row)
    sampler = max_num_seqs * c.vocab_size * 4 * 8  # sort, softmax, cumsum, noise (top-p/k)
    return prefill + graphs + sampler + _FIXED_RESERVE


def auto_num_blocks(
    free: int, total: int, utilization: float, reserve: int, block_bytes: int
) -> int:
    """KV blocks that fit in ``utilization`` of the GPU's ``total`` memory, less what is in
    use already (``total - free``: weights, CUDA context, other processes) and ``reserve``."""
    budget = int(total * utilization) - (total - free) - reserve
    blocks = budget // block_bytes
    if blocks < 1:
        raise RuntimeError(
            f"no GPU memory left for the KV pool: {free / 2**30:.2f} GiB free of "
            f"{total / 2**30:.2f} GiB, utilization {utilization}, reserve "
            f"{reserve / 2**30:.2f} GiB; lower the model size or raise gpu_memory_utilization"
        )
    return blocks


class ModelRunner:
    """Owns the model weights and the worker's KV pool, and runs batches on them.

    ``max_num_seqs`` (sequences in one decode step) bounds the decode CUDA graphs and
    ``max_batch_tokens`` (tokens in one prefill step) the activation reserve of an automatic
    KV pool size. ``num_blocks`` is the pool's real block count (the allocator's size).
    Call :meth:`warmup` once before serving.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        spec: ModelSpec,
        run: RunnerConfig,
        progress: bool = True,
        *,
        max_num_seqs: int = MAX_NUM_SEQS,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
    ) -> None:
        if run.num_threads > 0 and run.device == "cpu":
            torch.set_num_threads(run.num_threads)
        self.config = model_config
        self.run_config = run
        self.device = torch.device(run.device)
        self.block_size = cache_config.block_size
        if run.backend == "triton" and cache_config.dtype != run.dtype:
            raise ValueError(f"the triton kernels need the KV cache in the model dtype "
                             f"({run.dtype}), got {cache_config.dtype}")
        on_cuda = self.device.type == "cuda"
        self.graph_sizes = (graph_batch_sizes(max_num_seqs, run.cuda_graph_max_batch)
                            if on_cuda and not run.enforce_eager else [])
        weights = load_weights(spec, model_config, run.dtype, self.device, progress=progress)
        # What the KV handshake compares: shape, weights and tokenizer (engine.fingerprint).
        self.fingerprint = serving_fingerprint(model_config, weights_digest(weights),
                                               tokenizer_digest(spec))
        self.model = LlamaModel(model_config, weights, get_ops(run.backend))
        if cache_config.num_blocks == 0:
            if not on_cuda:
                raise ValueError("CacheConfig.num_blocks = 0 (auto) needs a CUDA device")
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # weight-loading temporaries must not count as used
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = activation_reserve_bytes(
                model_config, run.dtype, max_batch_tokens, max_num_seqs,
                max(self.graph_sizes, default=0),
            )
            block_bytes = kv_bytes_per_token(model_config, cache_config.dtype) * self.block_size
            num_blocks = auto_num_blocks(free, total, run.gpu_memory_utilization, reserve,
                                         block_bytes)
            cache_config = CacheConfig(self.block_size, num_blocks, cache_config.dtype)
        self.cache_config = cache_config
        self.num_blocks = cache_config.num_blocks
        self.kv_pool = allocate_kv_pool(model_config, cache_config, self.device)
        self.graphs: DecodeGraphs | None = None

    def warmup(self) -> None:
        """Before serving (CUDA; a no-op on CPU): JIT-compile the kernels with a small prefill
        and decode, then capture the decode CUDA graphs (unless ``enforce_eager``). It writes
        into block 0, so call it before any sequence's KV is stored."""
        if self.device.type != "cuda":
            return
        n = min(8, self.block_size)
        self.prefill([PrefillItem(list(range(n)), 0, [0])])
        self.decode_eager([DecodeItem(0, n - 1, [0])])
        self.capture_cuda_graphs()

    def capture_cuda_graphs(self) -> None:
        """Capture the decode step at each size of the ladder (``graph_sizes``); after this,
        :meth:`decode` replays them for the batches they fit."""
        if not self.graph_sizes or self.graphs is not None:
            return
        max_blocks = min(-(-self.config.max_position // self.block_size), self.num_blocks)
        graphs = DecodeGraphs(self.model, self.kv_pool, self.block_size, self.graph_sizes,
                              max_blocks)
        graphs.capture()
        self.graphs = graphs

    def synchronize(self) -> None:
        """Wait for the work queued so far on the compute stream (not on the KV channels'
        streams); a no-op on the CPU. A step that samples nothing calls it, so that the
        time it reports, and the next step's, are their own."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _slots(self, block_ids: Sequence[int], start: int, n: int) -> list[int]:
        bs = self.block_size
        return [block_ids[p // bs] * bs + p % bs for p in range(start, start + n)]

    def _block_table(self, tables: Sequence[Sequence[int]]) -> torch.Tensor:
        width = max(1, max(len(t) for t in tables))
        out = torch.zeros((len(tables), width), dtype=torch.int32)
        for i, t in enumerate(tables):
            out[i, : len(t)] = torch.tensor(list(t), dtype=torch.int32)
        return out.to(self.device)

    @torch.inference_mode()
    def prefill(
        self, items: Sequence[PrefillItem], on_layer_done: LayerHook | None = None
    ) -> torch.Tensor:
        """Run one prefill batch; returns float32 logits [B, V] at each item's last token."""
        input_ids, meta, last = self.prefill_inputs(items)
        hidden = self.model.forward(input_ids, meta, self.kv_pool, on_layer_done)
        return self.model.logits(hidden.index_select(0, last))

    def prefill_inputs(
        self, items: Sequence[PrefillItem]
    ) -> tuple[torch.Tensor, BatchMeta, torch.Tensor]:
        """A prefill batch's token ids [T], metadata and each item's last row [B], on the
        device. One host-to-device copy of the ids and the per-item numbers; the per-token
        positions and slots are computed there, so no copy waits for the GPU and the host
        returns as soon as the pass is queued."""
        bs = self.block_size
        lens = [len(it.token_ids) for it in items]
        for it, n in zip(items, lens, strict=True):
            if n == 0:
                raise ValueError("empty prefill chunk")
            if bs * len(it.block_ids) < it.start + n:
                raise ValueError("prefill chunk has too few blocks for its tokens")
        b, t = len(items), sum(lens)
        width = max(1, max(len(it.block_ids) for it in items))
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        host = array("q")  # ids | starts | cu | block table rows (zero-padded)
        for it in items:
            host.extend(it.token_ids)
        host.extend(it.start for it in items)
        host.extend(cu)
        for it in items:
            host.extend(it.block_ids)
            host.extend([0] * (width - len(it.block_ids)))
        dev = self.device
        d = torch.frombuffer(host, dtype=torch.int64).to(dev)
        input_ids, starts, cu_d = d[:t], d[t:t + b], d[t + b:t + 2 * b + 1]
        tables = d[t + 2 * b + 1:].view(b, width).to(torch.int32)
        lens_d = cu_d.diff()
        seq = torch.repeat_interleave(torch.arange(b, device=dev), lens_d, output_size=t)
        positions = torch.arange(t, device=dev) - cu_d[seq] + starts[seq]
        slots = tables[seq, positions // bs].long() * bs + positions % bs
        meta = BatchMeta(
            is_prefill=True,
            positions=positions,
            slot_mapping=slots,
            block_tables=tables,
            kv_lens=(starts + lens_d).to(torch.int32),
            cu_seqlens_q=cu_d.to(torch.int32),
            max_seqlen_q=max(lens),
        )
        return input_ids, meta, cu_d[1:] - 1

    def decode(self, items: Sequence[DecodeItem]) -> torch.Tensor:
        """Run one decode step (one new token per sequence); returns float32 logits [B, V].
        Replays a CUDA graph when one was captured for the batch (the logits are then a view
        of its output buffer, valid until the next step), else runs eagerly."""
        for it in items:
            if self.block_size * len(it.block_ids) <= it.position:
                raise ValueError("decode item has no slot for its token")
        if self.graphs is not None and self.graphs.fits(items):
            return self.graphs.run(items)
        return self.decode_eager(items)

    @torch.inference_mode()
    def decode_eager(self, items: Sequence[DecodeItem], num_splits: int = 0) -> torch.Tensor:
        """:meth:`decode` without CUDA graphs. ``num_splits``: the decode attention's KV split
        count (0 = planned from the batch)."""
        dev = self.device
        for it in items:
            if self.block_size * len(it.block_ids) <= it.position:
                raise ValueError("decode item has no slot for its token")
        meta = BatchMeta(
            is_prefill=False,
            positions=torch.tensor([it.position for it in items], dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(
                [self._slots(it.block_ids, it.position, 1)[0] for it in items],
                dtype=torch.int64, device=dev,
            ),
            block_tables=self._block_table([it.block_ids for it in items]),
            kv_lens=torch.tensor([it.position + 1 for it in items], dtype=torch.int32, device=dev),
            num_splits=num_splits,
        )
        input_ids = torch.tensor([it.token for it in items], dtype=torch.int64, device=dev)
        hidden = self.model.forward(input_ids, meta, self.kv_pool)
        return self.model.logits(hidden)
