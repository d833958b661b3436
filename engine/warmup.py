"""Bringing a worker's model up, and warming it before the worker reports ready: each
kernel shape family runs once, so that the first requests pay no Triton JIT compilation (a
first 4k-token prompt on a cold worker spent over a second compiling the prefill and
transfer kernels on an H200)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from pdserve.engine.config import ModelConfig, WorkerConfig
from pdserve.engine.kv_cache import BlockAllocator
from pdserve.engine.prefix_cache import PrefixCachingAllocator
from pdserve.engine.runner import DecodeItem, ModelRunner, PrefillItem
from pdserve.engine.weights import load_model_config
from pdserve.kernels._triton import HAS_TRITON, triton
from pdserve.kernels.kv_pack import pack_kv_checksum, unpack_kv_checksum


def warm_up(runner: ModelRunner, allocator: BlockAllocator, max_num_seqs: int,
            prefill: bool, decode: bool) -> None:
    """Scratch forward passes on two borrowed blocks (returned afterwards).

    On a GPU, prefill runs at every power-of-two batch size up to ``max_num_seqs`` (the
    prefill kernel specializes on it), with partial and full blocks, a cached prefix, and a
    block table wider than 1024 tokens (long prompts take other attention tiles); the
    transfer kernels (pack, unpack, checksum) run once. On the CPU nothing compiles, so one
    small pass each is enough.
    """
    bs = runner.block_size
    ids = allocator.allocate(2)
    try:
        if prefill:
            cuda = runner.device.type == "cuda"
            sizes = [1 << i for i in range(max(1, max_num_seqs).bit_length())] if cuda else [1]
            wide = [ids[0]] * (2048 // bs + 1)  # only the first block is written
            for b in sizes:
                for n in ((3, bs) if cuda else (min(8, bs),)):
                    runner.prefill([PrefillItem(list(range(1, n + 1)), 0, ids[:1])] * b)
                if cuda:
                    runner.prefill([PrefillItem([1, 2, 3], 0, wide)] * b)
            if cuda:  # a chunk after a cached prefix
                runner.prefill([PrefillItem([1, 2, 3], bs, ids)])
        if decode:
            runner.decode([DecodeItem(1, 0, ids[:1])])
        _warm_transfer_kernels(runner.kv_pool, ids[0])
    finally:
        allocator.free(ids)


# Worker steps longer than this are logged (a compile, a stall).
SLOW_STEP_S = 0.5


def report_late_compiles(log: logging.Logger) -> None:
    """After warm-up: log every Triton compilation from now on (one is a serving stall of a
    second or more, and a shape family the warm-up missed). Best effort: Triton's hook API
    differs between versions; without it nothing is logged."""
    if not HAS_TRITON:
        return
    knobs = getattr(getattr(triton, "knobs", None), "runtime", None)
    if knobs is None or not hasattr(knobs, "jit_cache_hook"):
        return

    def hook(*args: Any, **kwargs: Any) -> bool:
        log.warning("Triton compiled after warm-up: %s", kwargs.get("repr", "?"))
        return False

    knobs.jit_cache_hook = hook


def _warm_transfer_kernels(pool: torch.Tensor, block: int) -> None:
    """The KV channel's fused pack/unpack + checksum kernels, both directions, for the block
    counts Triton specializes on (1, a multiple of 16, any other). Only scratch block
    ``block`` is touched."""
    if pool.device.type != "cuda":
        return
    for n in (1, 3, 16):
        ids = torch.full((n,), block, dtype=torch.int64, device=pool.device)
        buf = torch.empty((1, 2, n, *pool.shape[3:]), dtype=pool.dtype, device=pool.device)
        pack_kv_checksum(pool[:1], ids, buf, 0)
        unpack_kv_checksum(buf, pool[:1], ids, 0)


def start_runner(cfg: WorkerConfig) -> tuple[ModelConfig, ModelRunner, BlockAllocator]:
    """A worker's model: its config, the runner (weights loaded, kernels compiled, decode
    CUDA graphs captured) and an allocator over the pool the runner sized. The runner's
    warm-up comes before any block is handed out and before another thread touches the
    GPU (graph capture needs the device to itself)."""
    model_config = load_model_config(cfg.model)
    runner = ModelRunner(model_config, cfg.cache, cfg.model, cfg.run,
                         max_num_seqs=cfg.max_num_seqs, max_batch_tokens=cfg.max_batch_tokens)
    runner.warmup()
    allocator = (PrefixCachingAllocator(runner.num_blocks) if cfg.enable_prefix_caching
                 else BlockAllocator(runner.num_blocks))
    return model_config, runner, allocator
