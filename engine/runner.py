"""Batch metadata and the forward pass of one worker: slot mapping, block tables,
cu_seqlens, logits. Knows nothing of Ray or gRPC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.config import CacheConfig, ModelConfig, ModelSpec, RunnerConfig
from engine.kv_cache import allocate_kv_pool
from engine.model import BatchMeta, LayerHook, LlamaModel
from engine.weights import load_weights
from kernels.ops import get_ops


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


class ModelRunner:
    """Owns the model weights and the worker's KV pool, and runs batches on them."""

    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        spec: ModelSpec,
        run: RunnerConfig,
        progress: bool = True,
    ) -> None:
        if run.num_threads > 0 and run.device == "cpu":
            torch.set_num_threads(run.num_threads)
        self.config = model_config
        self.cache_config = cache_config
        self.device = torch.device(run.device)
        self.block_size = cache_config.block_size
        weights = load_weights(spec, model_config, run.dtype, self.device, progress=progress)
        self.model = LlamaModel(model_config, weights, get_ops(run.backend))
        self.kv_pool = allocate_kv_pool(model_config, cache_config, self.device)

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
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        kv_lens = []
        for it in items:
            n = len(it.token_ids)
            if n == 0:
                raise ValueError("empty prefill chunk")
            if self.block_size * len(it.block_ids) < it.start + n:
                raise ValueError("prefill chunk has too few blocks for its tokens")
            ids.extend(it.token_ids)
            positions.extend(range(it.start, it.start + n))
            slots.extend(self._slots(it.block_ids, it.start, n))
            cu.append(cu[-1] + n)
            kv_lens.append(it.start + n)
        dev = self.device
        meta = BatchMeta(
            is_prefill=True,
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=self._block_table([it.block_ids for it in items]),
            kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            max_seqlen_q=max(len(it.token_ids) for it in items),
        )
        input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        hidden = self.model.forward(input_ids, meta, self.kv_pool, on_layer_done)
        last = torch.tensor([c - 1 for c in cu[1:]], dtype=torch.int64, device=dev)
        return self.model.logits(hidden.index_select(0, last))

    @torch.inference_mode()
    def decode(self, items: Sequence[DecodeItem]) -> torch.Tensor:
        """Run one decode step (one new token per sequence); returns float32 logits [B, V]."""
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
        )
        input_ids = torch.tensor([it.token for it in items], dtype=torch.int64, device=dev)
        hidden = self.model.forward(input_ids, meta, self.kv_pool)
        return self.model.logits(hidden)
