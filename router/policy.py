"""The router's view of the worker pools, and the ``fifo`` scheduler's placement rules
(pure functions over that view; the ``slo`` scheduler places by ``router.placement``).

The router tracks, per worker, what it last reported (decode: running sequences, free
blocks) and what it has handed out since (leases; prompt tokens queued). Under ``fifo``
``decode_order`` is the order in which decode workers are asked for a lease (the first that
grants one wins), then ``prefill_locally`` decides whether the prompt goes to a prefill
worker or is prefilled by that decode worker itself (conditional disaggregation by static
thresholds; under ``slo`` the thresholds, when set, override the cost model's choice).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pdserve.router.rates import Rate


@dataclass
class PromptQueue:
    """Prompt tokens a worker was handed and has not prefilled yet, their attention work
    (sum of n^2 per prompt, the cost model's term), and the rate at which prompt tokens
    have been handed to it (those expected to join its next step)."""

    name: str
    queued_tokens: int = 0
    queued_attention: int = 0
    num_blocks: int = 0  # the size of its KV pool (0: not known yet)
    arrivals: Rate = field(default_factory=Rate, repr=False, compare=False)

    def enqueue(self, n: int, now: float, attention: int | None = None) -> None:
        """``n`` prompt tokens to compute, of attention work ``attention`` (default n², a
        prompt from scratch; after a prefix cache hit less)."""
        self.queued_tokens += n
        self.queued_attention += n * n if attention is None else attention
        self.arrivals.observe(now, n)

    def dequeue(self, n: int, attention: int | None = None) -> None:
        self.queued_tokens -= n
        self.queued_attention -= n * n if attention is None else attention


@dataclass
class PrefillLoad(PromptQueue):
    """The router's running estimate of one prefill worker's queue, and of the step it runs
    now: the prompt tokens queued when that step began (0: idle) and when (router clock). A
    step begins when a prompt reaches an idle worker, and when a step ends (its first first
    token carries its ``StepTiming``) with prompts still queued; the prompts handed over
    during a step wait for the next one."""

    step_tokens: int = 0
    step_attention: int = 0
    step_started: float = 0.0

    def enqueue(self, n: int, now: float, attention: int | None = None) -> None:
        super().enqueue(n, now, attention)
        if self.step_tokens <= 0:
            self._begin(self.queued_tokens, now)

    def dequeue(self, n: int, attention: int | None = None) -> None:
        super().dequeue(n, attention)
        if self.queued_tokens <= 0:
            self.step_tokens = self.step_attention = 0
        else:
            self.step_tokens = min(self.step_tokens, self.queued_tokens)

    def step_ended(self, tokens: int, now: float) -> None:
        """A step of ``tokens`` prompt tokens ended now (before its prompts are dequeued):
        what is queued beyond them makes the next step."""
        self._begin(self.queued_tokens - tokens, now)

    def _begin(self, tokens: int, now: float) -> None:
        if tokens <= 0 or self.queued_tokens <= 0:
            self.step_tokens = self.step_attention = 0
            return
        self.step_tokens = min(tokens, self.queued_tokens)
        self.step_attention = self.queued_attention * self.step_tokens // self.queued_tokens
        self.step_started = now


@dataclass
class DecodeLoad(PromptQueue):
    """What one decode worker last reported, plus the leases granted since (counted the
    moment they are granted, so a burst does not all land on one worker before it reports
    a step), plus the prompts it prefills itself that have not produced a first token
    (``PromptQueue``). A decode worker that holds sequences steps without pause, so its
    current step began about when it sent its last report (``reported_at``)."""

    num_running: int = 0
    num_free_blocks: int = 0
    kv_usage: float = 0.0
    num_waiting: int = 0  # leases whose sequence is not running yet, as last reported
    context_tokens: int = 0  # of the running batch, as last reported
    granted: int = 0  # leases granted since the last report ...
    granted_blocks: int = 0  # ... the blocks they hold ...
    granted_tokens: int = 0  # ... and their context
    known: bool = False  # its free blocks were reported (or read from its stats) at least once
    reported_at: float = 0.0  # router clock of the last step report

    @property
    def batch(self) -> int:
        """Sequences it runs or has promised a seat to."""
        return self.num_running + self.num_waiting + self.granted

    @property
    def free_blocks(self) -> int:
        return self.num_free_blocks - self.granted_blocks

    @property
    def context(self) -> int:
        return self.context_tokens + self.granted_tokens

    def grant(self, blocks: int, tokens: int) -> None:
        self.granted += 1
        self.granted_blocks += blocks
        self.granted_tokens += tokens

    def report(self, num_running: int, num_waiting: int, num_free_blocks: int,
               kv_usage: float, context_tokens: int, now: float | None = None) -> None:
        """A step report (made at ``now``, None: not a step's): it counts every lease
        granted before it was made."""
        if now is not None:
            self.reported_at = now
        self.num_running, self.num_waiting = num_running, num_waiting
        self.num_free_blocks, self.kv_usage = num_free_blocks, kv_usage
        self.context_tokens = context_tokens
        self.granted = self.granted_blocks = self.granted_tokens = 0
        self.known = True


def pick_prefill(workers: Iterable[PrefillLoad],
                 cached: Mapping[str, int] | None = None) -> PrefillLoad:
    """The prefill worker with the fewest queued prompt tokens; ties go to the one expected
    to hold more of the prompt in its prefix cache (``cached``: tokens by worker), then to
    the first listed."""
    pool = list(workers)
    if not pool:
        raise LookupError("no prefill worker is accepting work")
    hits = cached or {}
    return min(pool, key=lambda w: (w.queued_tokens, -hits.get(w.name, 0)))


def decode_order(workers: Iterable[DecodeLoad],
                 cached: Mapping[str, int] | None = None) -> list[DecodeLoad]:
    """Decode workers to ask for a lease, most free KV first, then fewest running, then the
    one expected to hold more of the prompt in its prefix cache."""
    hits = cached or {}
    return sorted(workers, key=lambda w: (w.kv_usage, w.num_running, -hits.get(w.name, 0)))


@dataclass(frozen=True)
class LocalPrefillRule:
    """Conditional disaggregation, as NVIDIA Dynamo's disaggregated router decides it: a
    prompt is prefilled on the decode worker that leased it, not on a prefill worker, when
    it is short (its KV transfer and the hop through another worker cost about as much as
    prefilling it in place) or when the prefill worker it would go to is backed up (waiting
    in that queue would cost more than the chunked-prefill slowdown it brings to the decode
    steps it joins). 0 turns either part off; both off is plain disaggregation."""

    local_prefill_max_tokens: int = 0  # prompts of at most this many tokens prefill locally
    prefill_queue_max_tokens: int = 0  # every prompt does while the prefill worker has more

    def __post_init__(self) -> None:
        for name in ("local_prefill_max_tokens", "prefill_queue_max_tokens"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (0: off), got {value}")

    @property
    def enabled(self) -> bool:
        return self.local_prefill_max_tokens > 0 or self.prefill_queue_max_tokens > 0


def prefill_locally(num_tokens: int, prefill: PrefillLoad, rule: LocalPrefillRule) -> bool:
    """Whether ``num_tokens`` tokens to prefill (the prompt, plus after a preemption the
    tokens generated before it) go to the decode worker instead of ``prefill``, the prefill
    worker ``pick_prefill`` chose."""
    if num_tokens <= rule.local_prefill_max_tokens:
        return True
    return 0 < rule.prefill_queue_max_tokens < prefill.queued_tokens
