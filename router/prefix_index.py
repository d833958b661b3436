"""The router's prefix index: which worker holds which KV blocks in its prefix cache
(``engine.prefix_cache``), so placement can prefer the worker that holds the longest prefix
of a prompt (llm-d's prefix scorer and SGLang's cache-aware router do the same).

It is approximate, as SGLang's router's tree is: built from what the router itself placed,
not from the workers' own books. Every worker that prefills a prompt, and every decode
worker that receives or prefills one, caches the prompt's full blocks, so the index records
a placed prompt's block hashes for both (most recently used last) and keeps per worker at
most as many as the worker has KV blocks, dropping the least recently used first, the order
in which the worker evicts. It overestimates a worker whose pool is busy (blocks in use are
not cache), which costs only time: the worker looks its own cache up and computes whatever
it lacks, so no output depends on the index. The workers' real hits come back with each
prompt's first token (``FirstToken.cached_tokens``, the hit-rate metrics). A worker that
leaves or dies is forgotten (a replacement starts with an empty cache).

The hashes are the workers' own chain (``engine.prefix_cache.block_hashes``) under the
router's salt: they only need to agree within the router.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from pdserve.engine.prefix_cache import BlockHash, block_hashes, cacheable_blocks
from pdserve.router.request import Request

# Blocks the index keeps for a worker whose KV pool size it has not read yet.
DEFAULT_CAPACITY = 1 << 16


class PrefixIndex:
    """Per worker, an LRU of the block hashes the router expects it to hold."""

    def __init__(self, block_size: int, enabled: bool = True) -> None:
        self.block_size = block_size
        self.enabled = enabled
        self._held: dict[str, OrderedDict[BlockHash, None]] = {}
        self._capacity: dict[str, int] = {}

    def hashes(self, token_ids: Sequence[int], known: Sequence[BlockHash] = ()
               ) -> list[BlockHash]:
        """The hash chain of ``token_ids``' full blocks (``known``: its first ones, kept);
        empty with prefix caching off."""
        if not self.enabled:
            return []
        return block_hashes(token_ids, self.block_size, "router", known)

    def request_hashes(self, req: Request) -> list[BlockHash]:
        """The hashes of the full blocks of ``req``'s prompt + output (kept on the request,
        extended as the output grows: after a preemption both are prefilled again)."""
        tokens = req.prompt_ids + req.output_ids
        if self.enabled and len(req.block_hashes) < len(tokens) // self.block_size:
            req.block_hashes = self.hashes(tokens, req.block_hashes)
        return req.block_hashes

    def expected(self, req: Request, workers: Iterable[str]) -> dict[str, int]:
        """Per worker of ``workers``, the leading tokens of ``req``'s prompt + output it is
        expected to hold (those expected to hold none left out)."""
        if not self.enabled:
            return {}
        return self.cached_by_worker(workers, self.request_hashes(req),
                                     len(req.prompt_ids) + len(req.output_ids))

    def finished(self, req: Request) -> None:
        """``req`` finished on its decode worker, which keeps the full blocks of prompt +
        output (but the last token's, whose KV is never stored) in its prefix cache."""
        if req.lease is None or not self.enabled or not req.output_ids:
            return
        full = (len(req.prompt_ids) + len(req.output_ids) - 1) // self.block_size
        self.record(req.lease.worker, self.request_hashes(req)[:full])

    def set_capacity(self, worker: str, num_blocks: int) -> None:
        """``worker`` has ``num_blocks`` KV blocks: the index keeps at most that many."""
        self._capacity[worker] = max(0, num_blocks)
        self._trim(worker)

    def cached_tokens(self, worker: str, hashes: Sequence[BlockHash], num_tokens: int) -> int:
        """Leading tokens of a prompt of ``num_tokens`` tokens (full blocks ``hashes``) that
        ``worker`` is expected to find cached (never the whole prompt: its last token is
        always computed)."""
        held = self._held.get(worker)
        if not held:
            return 0
        n = 0
        for h in hashes[:cacheable_blocks(num_tokens, self.block_size)]:
            if h not in held:
                break
            n += 1
        return n * self.block_size

    def cached_by_worker(self, workers: Iterable[str], hashes: Sequence[BlockHash],
                         num_tokens: int) -> dict[str, int]:
        """``cached_tokens`` for each of ``workers`` expected to hold some of the prompt."""
        if not hashes:
            return {}
        out = {}
        for w in workers:
            n = self.cached_tokens(w, hashes, num_tokens)
            if n:
                out[w] = n
        return out

    def record(self, worker: str, hashes: Sequence[BlockHash]) -> None:
        """``worker`` caches the blocks ``hashes`` (it prefilled or received them): they
        are its most recently used."""
        if not hashes:
            return
        held = self._held.setdefault(worker, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        self._trim(worker)

    def forget(self, worker: str) -> None:
        """``worker`` left the deployment (or died): nothing of its cache is left."""
        self._held.pop(worker, None)
        self._capacity.pop(worker, None)

    def size(self, worker: str) -> int:
        return len(self._held.get(worker, ()))

    def _trim(self, worker: str) -> None:
        held = self._held.get(worker)
        if held is None:
            return
        cap = self._capacity.get(worker, DEFAULT_CAPACITY)
        while len(held) > cap:
            held.popitem(last=False)
