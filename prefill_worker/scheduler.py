"""Prefill batching under a token budget, with chunked prefill for long prompts.

Pure Python over a ``BlockAllocator``. A task holds blocks for its whole prompt from the
step it is admitted until its KV has left for the decode worker; a prompt longer than what
is left of a step's budget is split into chunks over successive steps, each chunk attending
to the KV of the chunks before it.

With prefix caching (a ``PrefixCachingAllocator``) a prompt is admitted with the longest
cached prefix of its full blocks shared, and its first chunk starts after that prefix; each
full block a step computes becomes findable by its hash as the step completes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.engine.chunking import PromptChunk, PromptChunker
from pdserve.engine.config import MAX_BATCH_TOKENS, MAX_NUM_SEQS, blocks_for
from pdserve.engine.kv_cache import BlockAllocator
from pdserve.engine.messages import PrefillTask, WorkerStats
from pdserve.engine.prefix_cache import (
    BlockHash,
    PrefixCachingAllocator,
    acquire_blocks,
    block_hashes,
)


@dataclass(eq=False)
class PrefillSeq:
    """A task admitted to this worker. Compared by identity, like ``DecodeSeq``."""

    task: PrefillTask
    block_ids: list[int]
    arrived: float
    started: float = 0.0
    first_token: int = -1  # sampled when the last chunk ran
    hashes: list[BlockHash] = field(default_factory=list)  # of the prompt's full blocks
    cached_tokens: int = 0  # the leading tokens found in the prefix cache

    @property
    def sent_blocks(self) -> list[int]:
        """The blocks whose KV goes to the decode worker: all but the leading ones it
        holds already (``Lease.cached_blocks``)."""
        return self.block_ids[self.task.lease.cached_blocks:]


Chunk = PromptChunk[PrefillSeq]


class PrefillScheduler:
    """FCFS queue of prefill tasks, batched under ``max_batch_tokens`` per step."""

    def __init__(
        self,
        allocator: BlockAllocator,
        block_size: int,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
        max_num_seqs: int = MAX_NUM_SEQS,
        clock: Callable[[], float] = time.monotonic,
        salt: str = "",
    ) -> None:
        if max_batch_tokens < block_size:
            raise ValueError("max_batch_tokens must be at least one block")
        self.allocator = allocator
        self.block_size = block_size
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.clock = clock
        self.salt = salt  # of the block hashes: the model this worker serves
        self.caching = isinstance(allocator, PrefixCachingAllocator)
        self.waiting: deque[PrefillSeq] = deque()
        self.chunker: PromptChunker[PrefillSeq] = PromptChunker()  # admitted, not all cached

    def add(self, task: PrefillTask) -> None:
        if not task.token_ids:
            raise ValueError(f"request {task.request_id}: empty prompt")
        blocks = blocks_for(len(task.token_ids), self.block_size)
        if blocks > self.allocator.num_blocks:
            raise ValueError(
                f"request {task.request_id}: prompt needs {blocks} blocks, the pool has "
                f"{self.allocator.num_blocks}"
            )
        if task.lease.cached_blocks * self.block_size >= len(task.token_ids):
            raise ValueError(f"request {task.request_id}: the decode worker holds "
                             f"{task.lease.cached_blocks} blocks, the whole prompt")
        hashes = (block_hashes(task.token_ids, self.block_size, self.salt)
                  if self.caching else [])
        self.waiting.append(PrefillSeq(task, [], self.clock(), hashes=hashes))

    @property
    def active(self) -> list[PrefillSeq]:
        """Admitted tasks with some chunks still to run, oldest first."""
        return list(self.chunker)

    @property
    def queued_tokens(self) -> int:
        return sum(len(s.task.token_ids) for s in self.waiting) + self.chunker.queued_tokens

    def stats(self, worker: str, device: str) -> WorkerStats:
        return WorkerStats(
            worker=worker, role="prefill", num_blocks=self.allocator.num_blocks,
            num_free_blocks=self.allocator.num_free, num_running=len(self.chunker),
            num_waiting=len(self.waiting), kv_usage=self.allocator.usage, device=device)

    def abort(self, request_id: str, transfer_id: int | None = None) -> PrefillSeq | None:
        """Drop a task that has not finished prefill (with ``transfer_id``, only the attempt
        prefilled for that lease); the caller frees its blocks once no step that uses them
        is in flight."""
        def match(s: PrefillSeq) -> bool:
            return s.task.request_id == request_id and (
                transfer_id is None or s.task.lease.transfer_id == transfer_id)

        for s in self.waiting:
            if match(s):
                self.waiting.remove(s)
                return s
        for s in self.chunker:
            if match(s):
                self.chunker.discard(s)
                return s
        return None

    def schedule(self) -> list[Chunk]:
        """The next step's chunks: unfinished prompts first, then new ones while the token
        budget, the sequence cap and the free blocks allow."""
        # Admit, then chunk: the chunker serves the unfinished prompts first, so a new one
        # gets what they (and the new ones before it) leave of the budget, if anything.
        budget = self.max_batch_tokens - self.chunker.queued_tokens
        num_seqs = len(self.chunker)
        while self.waiting and budget > 0 and num_seqs < self.max_num_seqs:
            s = self.waiting[0]
            n = len(s.task.token_ids)
            got = acquire_blocks(self.allocator, s.hashes, n, blocks_for(n, self.block_size),
                                 self.block_size)
            if got is None:
                break
            self.waiting.popleft()
            s.block_ids, hit = got
            s.cached_tokens = hit * self.block_size
            s.started = self.clock()
            self.chunker.add(s, s.task.token_ids, s.cached_tokens)
            budget -= n - s.cached_tokens
            num_seqs += 1
        return self.chunker.schedule(self.max_batch_tokens)

    def complete(self, chunks: list[Chunk]) -> list[PrefillSeq]:
        """Record that ``chunks`` ran; returns the sequences whose whole prompt is cached.
        The full blocks the chunks completed become findable in the prefix cache."""
        if isinstance(self.allocator, PrefixCachingAllocator):
            for c in chunks:
                if c.seq in self.chunker:  # (not dropped during the step)
                    full = (c.start + c.length) // self.block_size
                    self.allocator.cache(c.seq.block_ids[:full], c.seq.hashes[:full])
        return self.chunker.complete(chunks)
