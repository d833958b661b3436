"""Automatic prefix caching: full KV blocks kept after their request ends, found again by
the hash of the tokens up to and including them (vLLM V1's KV cache manager does the same).

A full block's hash is ``H(parent block's hash, the block's token ids)``, the first block's
parent being a salt (the model's fingerprint): equal hashes mean equal token prefixes, so a
differing earlier block changes every later hash. Only FULL blocks are hashed; the partial
last block of a prompt is always the request's own.

``PrefixCachingAllocator`` is a ``BlockAllocator`` (same contract for its callers) that also
keeps a hash -> block map. A freed block whose hash is known is not returned to the free
list but parked in an LRU of evictable cached blocks (reference count 0); ``allocate`` takes
the free list first, then evicts from the LRU's head (its hash forgotten). ``num_free``
counts both: an evictable block is free capacity for the router's view. ``match`` finds the
longest cached prefix of a hash chain and ``share`` takes a reference to each of its blocks
(an evictable one leaves the LRU), so a block is never handed out while a request holds it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from pdserve.engine.kv_cache import BlockAllocator, OutOfBlocks

BlockHash = bytes  # 16 bytes of BLAKE2b


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str = "",
                 start: Sequence[BlockHash] = ()) -> list[BlockHash]:
    """The hash chain of ``token_ids``' full blocks; ``start``: the hashes of its first
    blocks, already known (extended, not recomputed)."""
    out = list(start)
    parent = out[-1] if out else salt.encode()
    for b in range(len(out), len(token_ids) // block_size):
        block = token_ids[b * block_size:(b + 1) * block_size]
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", block).tobytes())
        parent = h.digest()
        out.append(parent)
    return out


def cacheable_blocks(num_tokens: int, block_size: int) -> int:
    """How many leading full blocks of a prompt of ``num_tokens`` tokens a cache hit may
    cover: never the whole prompt, since its last token must be computed (its logits give
    the first output token)."""
    return max(0, (num_tokens - 1) // block_size)


class PrefixCachingAllocator(BlockAllocator):
    """A block allocator whose freed full blocks stay findable by hash until evicted."""

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        self._by_hash: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU: head goes first
        self.evicted = 0  # blocks evicted so far

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks findable by hash (in use or evictable)."""
        return len(self._by_hash)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks (free ones first, then the least recently used cached ones,
        whose hashes are forgotten), each with a reference count of one."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            raise OutOfBlocks(f"asked for {n} blocks, {self.num_free} free")
        ids = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of.pop(b)]
                self.evicted += 1
            self._refs[b] = 1
            ids.append(b)
        return ids

    def share(self, ids: list[int]) -> None:
        """Add a reference to each block: held ones, or cached ones (an evictable block
        leaves the LRU and is in use again)."""
        for b in ids:
            if self._refs[b] <= 0 and b not in self._evictable:
                raise ValueError(f"block {b} is neither allocated nor cached")
        for b in ids:
            self._evictable.pop(b, None)
            self._refs[b] += 1

    def free(self, ids: list[int]) -> None:
        """Drop one reference from each block. A block reaching zero goes to the LRU if it
        is cached, else to the free list. A request's blocks are parked last block first,
        so its tail (the part least likely shared) is evicted before its head."""
        for b in ids:
            if not 0 <= b < self.num_blocks or self._refs[b] <= 0:
                raise ValueError(f"double free or bad block id {b}")
        for b in reversed(ids):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def match(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The blocks of the longest cached prefix of ``hashes`` (no reference taken: the
        caller shares them under the same lock)."""
        ids = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            ids.append(b)
        return ids

    def cache(self, ids: Sequence[int], hashes: Sequence[BlockHash]) -> None:
        """Make held blocks ``ids`` (their KV computed or received) findable by ``hashes``
        (zip: the shorter decides). A hash already cached on another block keeps that one
        (this block stays the request's own and is freed plainly)."""
        for b, h in zip(ids, hashes, strict=False):
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} is not allocated")
            if h in self._by_hash or b in self._hash_of:
                continue
            self._by_hash[h] = b
            self._hash_of[b] = h

    def reset(self) -> int:
        """Forget every evictable block (they return to the free list); returns how many."""
        n = len(self._evictable)
        for b in self._evictable:
            del self._by_hash[self._hash_of.pop(b)]
            self._free.append(b)
        self._evictable.clear()
        return n


def acquire_blocks(allocator: BlockAllocator, hashes: Sequence[BlockHash], num_tokens: int,
                   total_blocks: int, block_size: int) -> tuple[list[int], int] | None:
    """Blocks for a sequence of ``num_tokens`` tokens needing ``total_blocks`` in all, whose
    full blocks hash to ``hashes``: the longest cached prefix (at most
    ``cacheable_blocks``), shared, then new blocks for the rest. Returns (block ids, how
    many leading ones came from the cache), or None, taking nothing, when the free blocks
    (evictable ones counted, but not those this very hit revives) fall short. A plain
    ``BlockAllocator`` (prefix caching off) just allocates."""
    hit: list[int] = []
    if isinstance(allocator, PrefixCachingAllocator) and hashes:
        hit = allocator.match(hashes[:cacheable_blocks(num_tokens, block_size)])
    need = total_blocks - len(hit)
    revived = sum(1 for b in hit if allocator.ref_count(b) == 0)
    if not 0 <= need <= allocator.num_free - revived:
        return None
    allocator.share(hit)
    return hit + allocator.allocate(need), len(hit)
