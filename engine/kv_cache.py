"""The paged KV pool of one worker and its block allocator.

The allocator is pure Python (no torch) so it can be unit-tested on its own; the pool is
one tensor ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` where
``pool[l, 0]`` / ``pool[l, 1]`` are layer l's K and V caches.
"""

from __future__ import annotations

from collections import deque

import torch

from pdserve.engine.config import CacheConfig, ModelConfig


class OutOfBlocks(Exception):
    """Raised when an allocation asks for more blocks than are free."""


class BlockAllocator:
    """Free list plus reference counts over ``num_blocks`` block ids."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks, each with a reference count of one."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        for b in ids:
            self._refs[b] = 1
        return ids

    def share(self, ids: list[int]) -> None:
        """Add a reference to blocks already held (prefix reuse)."""
        for b in ids:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} is not allocated")
            self._refs[b] += 1

    def free(self, ids: list[int]) -> None:
        """Drop one reference from each block; blocks reaching zero return to the free list."""
        for b in ids:
            if not 0 <= b < self.num_blocks or self._refs[b] <= 0:
                raise ValueError(f"double free or bad block id {b}")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._refs[block]


def allocate_kv_pool(
    model: ModelConfig, cache: CacheConfig, device: torch.device | str
) -> torch.Tensor:
    """The worker's whole KV pool: ``[L, 2, N, bs, Hk, D]`` in the cache dtype."""
    shape = (model.num_layers, 2, cache.num_blocks, cache.block_size,
             model.num_kv_heads, model.head_dim)
    return torch.zeros(shape, dtype=cache.dtype, device=device)


def kv_bytes_per_token(model: ModelConfig, dtype: torch.dtype) -> int:
    itemsize = dtype.itemsize
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * itemsize
