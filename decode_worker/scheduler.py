"""Decode-side bookkeeping: leases made before prefill, continuous batching, preemption.

Pure Python over a ``BlockAllocator``; the worker actor calls it under its lock and does
the tensor work. A sequence passes through three states here:

    reserved (blocks held, KV not yet arrived, or with local prefill its prompt being
    prefilled here) -> ready (KV verified, waits for the next step) -> running (in the
    batch) -> finished / aborted / preempted (blocks freed)

With prefix caching (a ``PrefixCachingAllocator``) a lease shares the longest cached prefix
of the reservation's tokens and says how many blocks that is (``Lease.cached_blocks``): the
prefill worker sends only the rest, and local prefill starts after it. Every full block
whose KV is in place (received, prefilled here, or filled by decode steps) becomes findable
by its hash, so a later request with the same prefix finds it here.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.engine.chunking import PromptChunk, PromptChunker
from pdserve.engine.config import LEASE_TIMEOUT_S, MAX_NUM_SEQS, blocks_for
from pdserve.engine.kv_cache import BlockAllocator
from pdserve.engine.messages import Lease, Reservation, TokenLogprobs, TokenOut, WorkerStats
from pdserve.engine.prefix_cache import (
    BlockHash,
    PrefixCachingAllocator,
    acquire_blocks,
    block_hashes,
)
from pdserve.engine.sequence import SamplingParams, finish_reason


@dataclass(eq=False)
class DecodeSeq:
    """A sequence owned by this decode worker.

    ``num_tokens`` counts the tokens in its context including ``last_token``, whose KV is
    not stored yet (the next step stores it at position ``num_tokens - 1``).

    Compared and hashed by identity: a sequence is an entity whose fields change every step.
    The scheduler keeps sets of them; value equality made ``schedule`` and ``postprocess``
    compare fields pairwise, quadratic in the batch (26 ms a step at 256 sequences on an
    H200's host, see docs/benchmarks.md).
    """

    request_id: str
    sampling: SamplingParams
    block_ids: list[int]
    num_tokens: int
    num_generated: int
    transfer_id: int
    deadline: float
    order: int = 0  # the request's admission number (Reservation.order): larger is younger
    last_token: int = -1
    # Prefix caching: the sequence's tokens (prompt, then each one sampled; empty: not
    # known, nothing cached), the hashes of its full blocks cached so far, and how many
    # leading blocks the lease found cached.
    token_ids: list[int] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)
    cached_blocks: int = 0
    # Prompt + output tokens (last_token included once it is known), kept only when the
    # sampling uses penalties: the sampler counts them. None otherwise.
    history: list[int] | None = None


PrefillChunk = PromptChunk[DecodeSeq]  # local prefill: a chunk of a reserved sequence


@dataclass
class StepPlan:
    """What the next step runs, and who was pushed out to make room."""

    batch: list[DecodeSeq] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    chunks: list[PrefillChunk] = field(default_factory=list)  # local prefill only


class DecodeScheduler:
    """Leases, the running batch and block growth of one decode worker."""

    def __init__(
        self,
        allocator: BlockAllocator,
        block_size: int,
        worker: str,
        max_num_seqs: int = MAX_NUM_SEQS,
        lease_timeout_s: float = LEASE_TIMEOUT_S,
        epoch: int = 0,
        clock: Callable[[], float] = time.monotonic,
        first_transfer_id: int = 1,
        salt: str = "",
    ) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.worker = worker
        self.max_num_seqs = max_num_seqs
        self.lease_timeout_s = lease_timeout_s
        self.epoch = epoch
        self.clock = clock
        self.salt = salt  # of the block hashes: the model this worker serves
        self.caching = isinstance(allocator, PrefixCachingAllocator)
        self._ids = itertools.count(first_transfer_id)
        self.reserved: dict[int, DecodeSeq] = {}  # by transfer id
        # Local prefill (colocated mode, conditional disaggregation): reserved sequences whose
        # prompt this worker prefills itself. The others wait for their KV to arrive.
        self.prefilling: PromptChunker[DecodeSeq] = PromptChunker()
        self.ready: list[DecodeSeq] = []
        self.running: list[DecodeSeq] = []

    # -- leases ---------------------------------------------------------------------------
    def reserve(self, r: Reservation) -> Lease | None:
        """Hold blocks for the prompt's KV plus the first generated token, or None if this
        worker cannot take the request now."""
        if self.find(r.request_id) is not None:
            raise ValueError(f"request {r.request_id} already holds a lease here")
        if len(self.reserved) + len(self.ready) + len(self.running) >= self.max_num_seqs:
            return None
        if r.token_ids and len(r.token_ids) != r.num_tokens:
            raise ValueError(f"request {r.request_id}: reservation for {r.num_tokens} "
                             f"tokens carries {len(r.token_ids)} token ids")
        n = blocks_for(r.num_tokens + 1, self.block_size)
        tokens = list(r.token_ids) if self.caching else []
        hashes = block_hashes(tokens, self.block_size, self.salt)
        got = acquire_blocks(self.allocator, hashes, r.num_tokens, n, self.block_size)
        if got is None:
            return None
        ids, hit = got
        tid = next(self._ids)
        self.reserved[tid] = DecodeSeq(
            request_id=r.request_id, sampling=r.sampling, block_ids=ids,
            num_tokens=r.num_tokens + 1, num_generated=r.num_generated + 1, transfer_id=tid,
            deadline=self.clock() + self.lease_timeout_s, order=r.order,
            token_ids=tokens, hashes=hashes[:hit], cached_blocks=hit,
            history=list(r.token_ids) if r.sampling.uses_penalties else None,
        )
        return Lease(self.worker, r.request_id, tid, self.epoch, n, self.lease_timeout_s,
                     cached_blocks=hit)

    def lease(self, transfer_id: int) -> DecodeSeq | None:
        """The reservation an incoming transfer claims, if this worker still holds it."""
        return self.reserved.get(transfer_id)

    def activate(self, transfer_id: int, first_token: int) -> bool:
        """The KV for ``transfer_id`` arrived and verified: the sequence joins at the next
        step with ``first_token`` (sampled by the prefill worker) as its last token."""
        seq = self.reserved.pop(transfer_id, None)
        if seq is None:
            return False
        seq.last_token = first_token
        if seq.token_ids:
            seq.token_ids.append(first_token)
        if seq.history is not None:
            seq.history.append(first_token)
        self._cache_full_blocks(seq)
        self.ready.append(seq)
        return True

    def _cache_full_blocks(self, seq: DecodeSeq) -> None:
        """Make ``seq``'s full blocks whose KV is in place findable in the prefix cache
        (every token's but ``last_token``'s)."""
        if not self.caching or not seq.token_ids:
            return
        full = (seq.num_tokens - 1) // self.block_size
        if full > len(seq.hashes):
            seq.hashes = block_hashes(seq.token_ids[:full * self.block_size],
                                      self.block_size, self.salt, seq.hashes)
            assert isinstance(self.allocator, PrefixCachingAllocator)
            self.allocator.cache(seq.block_ids[:full], seq.hashes)

    def start_prefill(self, transfer_id: int, token_ids: list[int]) -> bool:
        """Local prefill: this worker prefills the prompt of lease ``transfer_id`` itself
        (no transfer), in chunks mixed into its decode steps."""
        seq = self.reserved.get(transfer_id)
        if seq is None:
            return False
        if len(token_ids) != seq.num_tokens - 1:
            raise ValueError(f"lease {transfer_id} was made for {seq.num_tokens - 1} tokens, "
                             f"got {len(token_ids)}")
        if seq.token_ids and seq.token_ids != list(token_ids):
            raise ValueError(f"lease {transfer_id} was made for other tokens")
        if self.caching:
            seq.token_ids = list(token_ids)
        self.prefilling.add(seq, list(token_ids), seq.cached_blocks * self.block_size)
        seq.deadline = float("inf")  # no KV to wait for
        return True

    def schedule_prefill(self, budget: int) -> list[PrefillChunk]:
        """Local prefill: prompt chunks for this step, oldest first, under ``budget``
        tokens (what the decode batch leaves of the step's token budget); none when no
        prompt is being prefilled here."""
        return self.prefilling.schedule(budget)

    def prefilled(self, chunks: list[PrefillChunk]) -> list[DecodeSeq]:
        """Record that ``chunks`` ran; returns sequences whose whole prompt is cached (their
        first token is sampled by the caller and passed to :meth:`activate`, which makes
        their full blocks findable in the prefix cache)."""
        return self.prefilling.complete(chunks)

    def expire(self) -> list[tuple[str, int]]:
        """Free leases whose KV did not arrive in time; returns their (request id, transfer
        id) pairs."""
        now = self.clock()
        gone = [s for s in self.reserved.values() if s.deadline <= now]
        for s in gone:
            del self.reserved[s.transfer_id]
            self.allocator.free(s.block_ids)
        return [(s.request_id, s.transfer_id) for s in gone]

    def find(self, request_id: str, transfer_id: int | None = None) -> DecodeSeq | None:
        """``request_id``'s sequence here; with ``transfer_id``, only that attempt's (an
        abort of an old attempt that arrives after the request's next lease must not find
        the new one)."""
        for s in itertools.chain(self.reserved.values(), self.ready, self.running):
            if s.request_id == request_id:
                return s if transfer_id is None or s.transfer_id == transfer_id else None
        return None

    def stats(self, device: str) -> WorkerStats:
        return WorkerStats(
            worker=self.worker, role="decode", num_blocks=self.allocator.num_blocks,
            num_free_blocks=self.allocator.num_free, num_running=len(self.running),
            num_waiting=len(self.reserved) + len(self.ready), kv_usage=self.allocator.usage,
            device=device)

    def release(self, request_id: str) -> bool:
        """Abort/finish from outside: free the request's blocks in whatever state it is."""
        seq = self.find(request_id)
        if seq is None:
            return False
        self.reserved.pop(seq.transfer_id, None)
        self.prefilling.discard(seq)
        for group in (self.ready, self.running):
            if seq in group:
                group.remove(seq)
        self.allocator.free(seq.block_ids)
        return True

    # -- steps ----------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Admit ready sequences, then give every running sequence a slot for its next
        token; when blocks run out, preempt the youngest request, by admission order (it
        goes back to the router, which re-prefills prompt + generated tokens, and keeps its
        order: when it rejoins, it is not the youngest again)."""
        self.running.extend(self.ready)
        self.ready.clear()
        plan = StepPlan()
        out: set[DecodeSeq] = set()  # preempted in this call
        for seq in self.running:
            if seq in out:
                continue  # preempted while making room for an older one
            need = blocks_for(seq.num_tokens, self.block_size) - len(seq.block_ids)
            while need > 0 and not self.allocator.can_allocate(need):
                victim = max((s for s in self.running if s not in out),
                             key=lambda s: s.order)
                out.add(victim)
                self.allocator.free(victim.block_ids)
                plan.preempted.append(victim.request_id)
                if victim is seq:
                    break
            if need > 0 and seq not in out:
                seq.block_ids.extend(self.allocator.allocate(need))
        if out:
            self.running = [s for s in self.running if s not in out]
        plan.batch = list(self.running)
        return plan

    def postprocess(self, batch: list[DecodeSeq], tokens: list[int],
                    logprobs: list[TokenLogprobs | None] | None = None) -> list[TokenOut]:
        """Append each sampled token (with its logprobs, when asked for); finished
        sequences free their blocks."""
        out = []
        running = set(self.running)  # (one aborted during the step is gone)
        done: set[DecodeSeq] = set()
        lps = logprobs if logprobs is not None else [None] * len(batch)
        for seq, tok, lp in zip(batch, tokens, lps, strict=True):
            if seq not in running:
                continue  # aborted while the step ran
            seq.num_tokens += 1
            seq.num_generated += 1
            seq.last_token = tok
            if seq.token_ids:
                seq.token_ids.append(tok)
            if seq.history is not None:
                seq.history.append(tok)
            reason = finish_reason(seq.sampling, tok, seq.num_generated)
            out.append(TokenOut(seq.request_id, seq.transfer_id, tok, reason, lp))
            self._cache_full_blocks(seq)
            if reason is not None:
                done.add(seq)
                self.allocator.free(seq.block_ids)
        if done:
            self.running = [s for s in self.running if s not in done]
        return out
