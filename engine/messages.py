"""Control messages between the router and the workers (carried by Ray calls).

They hold plain ints, strings and floats; KV data never travels in them (it goes over the
per-pair channel of ``engine.kv``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from pdserve.engine.sequence import SamplingParams


class TokenLogprobs(NamedTuple):
    """A sampled token's logprob under the model's raw distribution, and its best
    alternatives (best first; as many as the request's top_logprobs). A tuple: it packs into
    a msgpack list on the feed as it is."""

    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass(frozen=True)
class Reservation:
    """Router -> decode worker: hold blocks for a request whose KV is about to arrive.

    ``num_tokens`` is the number of tokens whose KV the prefill worker will send (the prompt
    plus, after a preemption, the tokens generated before it); ``num_generated`` counts
    output tokens already streamed to the client before this attempt. ``order`` is the
    request's admission number on the router, the same for every attempt: the decode
    worker preempts the youngest request (largest order) first.
    """

    request_id: str
    num_tokens: int
    num_generated: int
    sampling: SamplingParams
    order: int
    # The tokens themselves (prompt + generated before a preemption), sent when the decode
    # worker needs them: for its prefix cache (it shares the leading blocks it holds cached
    # and says how many in the lease, Lease.cached_blocks) or for a sampling with penalties
    # (it counts them); empty otherwise.
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Lease:
    """Decode worker -> router: blocks are held for ``transfer_id`` until ``expires_in_s``
    (``num_blocks`` of them, ``cached_blocks`` of those shared from its prefix cache)."""

    worker: str
    request_id: str
    transfer_id: int
    epoch: int
    num_blocks: int
    expires_in_s: float
    # Leading blocks of the request's KV that the decode worker holds already (its prefix
    # cache): the prefill worker sends only the blocks after them.
    cached_blocks: int = 0


@dataclass(frozen=True)
class PrefillTask:
    """Router -> prefill worker: prefill ``token_ids`` and send the KV to ``lease.worker``."""

    request_id: str
    token_ids: tuple[int, ...]
    num_generated: int
    sampling: SamplingParams
    lease: Lease


@dataclass(frozen=True)
class StepTiming:
    """One prefill step as the worker measured it, for the router's cost model: ``tokens``
    new tokens in the step, its attention work (``engine.chunking.attention_work``) and its
    wall seconds (forward pass and sampling)."""

    tokens: int
    attention: int
    seconds: float


@dataclass(frozen=True)
class FirstToken:
    """Worker -> router, sent the moment the first token is sampled (TTFT ends): by the
    prefill worker, or by a decode worker that prefilled the prompt itself."""

    worker: str
    request_id: str
    transfer_id: int  # the lease it was prefilled for: tells attempts apart
    token: int
    finish_reason: str | None
    queue_s: float
    prefill_s: float
    # The prefill worker's step in which this prompt's last chunk ran. Only the first prompt
    # reported from a step carries it (the others None), so the router observes each step
    # once. A decode worker's local prefill leaves it None: its prompt chunks are in the
    # mixed step's StepReport (prefill_tokens, prefill_attention).
    step: StepTiming | None = None
    # The prefix cache (engine.prefix_cache): of the ``num_tokens`` tokens prefilled, the
    # leading ``cached_tokens`` were found cached on this worker and not computed.
    num_tokens: int = 0
    cached_tokens: int = 0
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@dataclass(frozen=True)
class TransferDone:
    """Prefill worker -> router after the KV left (or failed to leave) for the decode worker.

    ``broken_channel`` names the KV channel when the transfer failed because that channel
    broke or was closed (the router reopens the pair under a new name); '' otherwise."""

    worker: str
    request_id: str
    transfer_id: int  # the lease it was prefilled for: tells attempts apart
    ok: bool
    seconds: float
    nbytes: int
    error: str = ""
    broken_channel: str = ""


@dataclass(frozen=True)
class TokenOut:
    """One sequence's new token in a decode step."""

    request_id: str
    transfer_id: int  # the lease the sequence joined under: tells attempts apart
    token: int
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@dataclass(frozen=True)
class StepReport:
    """Decode worker -> router: ONE message per decode step, for every sequence in it.

    ``joined`` lists requests whose KV arrived and verified since the last report (their
    first decode step is in ``tokens``); ``preempted`` must be re-prefilled; ``failed``
    carries (request_id, transfer_id, reason) for leases that expired or transfers that
    failed (the transfer id tells the attempt apart from the request's later ones);
    ``broken_channels`` names the KV channels whose receiver ended since the last report
    (broken, or closed by either end: the router reopens the pairs still serving).
    """

    worker: str
    tokens: list[TokenOut] = field(default_factory=list)
    joined: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    failed: list[tuple[str, int, str]] = field(default_factory=list)
    step_s: float = 0.0
    num_running: int = 0
    num_free_blocks: int = 0
    kv_usage: float = 0.0
    # For the router's cost model: the step ran ``len(tokens)`` sequences (those aborted
    # during it aside) holding ``context_tokens`` tokens of context in all (the new ones
    # included), plus, with local prefill, ``prefill_tokens`` prompt tokens of attention
    # work ``prefill_attention`` mixed into the same forward pass; ``step_s`` is its time.
    context_tokens: int = 0
    prefill_tokens: int = 0
    prefill_attention: int = 0
    num_waiting: int = 0  # leases not running yet: reserved (KV or prompt to come) + ready
    broken_channels: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class WorkerStats:
    """A worker's view of itself, for health, metrics and tests."""

    worker: str
    role: str
    num_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    kv_usage: float
    device: str = ""  # e.g. "cuda:0 NVIDIA H200 (CUDA_VISIBLE_DEVICES=1)"
