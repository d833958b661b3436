"""Placement under the ``slo`` scheduler: for a request, every (prefill worker or local
prefill, decode worker) choice with its predicted TTFT and TPOT, best first.

Predictions come from the cost model (``router.cost_model``) over the router's view of the
pools (``router.policy``'s loads):

- TTFT on a prefill worker P: what is left of the step P runs (``PrefillLoad``: which
  prompts it holds and when it began), then the prompt tokens queued beyond it, those
  expected to reach P before the next step begins (P's recent token rate times the wait),
  and this prompt, in steps of ``max_batch_tokens`` (pdserve streams the first token the
  moment P samples it, before the KV moves, so the transfer is not part of TTFT; it delays
  the second token). Without the step in progress and the prompts that join the next one,
  a worker that is always busy reads as idle: on the CPU demo at half its capacity the
  TTFT prediction fell 0.5 short of the measurement in the median (2026-12-07).
- TTFT with local prefill on a decode worker D: what is left of D's step (it began at D's
  last step report), then D's queued prompt tokens beyond that step's chunk, the tokens
  expected meanwhile, and this prompt, in mixed steps of what D's decode batch leaves of
  the step's token budget.
- TPOT on D: D's mean step while the request decodes, at the batch it would join (the
  sequences it runs or has promised a seat to, plus this one), stretched by the share of
  D's time the prompt chunks it prefills itself take (their recent token rate, plus this
  prompt under local prefill). The step with this prompt's own chunk in it is one step of
  the many the request decodes in: taken as the TPOT it read twice the measured TPOT in
  colocated mode on an H100 (docs/benchmarks.md, 2026-12-07).

- The prefix cache: a worker expected to hold the prompt's first c tokens
  (``router.prefix_index``, ``Ask.cached``) computes only the other n - c, of attention
  (n - c)·n, and a decode worker that holds them receives only the rest's KV. So a worker
  with the prefix wins where its queue leaves it faster, and an idle one wins over a loaded
  holder where the cost model says the queue costs more than the prefix saves.

A choice is feasible when both predictions meet the request's own objectives. Its harm is
the number of requests already on D whose TPOT objective the choice would break: objectives
that D's step meets now and would not once the request joins (``Placement.harm``). Choices
come feasible first, then by harm, then by headroom: the smaller of 1 - predicted /
objective over the phases with an objective, so load spreads to the workers with the most
slack; without objectives, by the predicted time to the second token. Harm is a cost, not a
bar: the scheduler (``router.scheduler``) holds a request back for it only while the
request can afford the wait.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pdserve.engine.config import blocks_for
from pdserve.router.cost_model import CostModel
from pdserve.router.policy import (
    DecodeLoad,
    LocalPrefillRule,
    PrefillLoad,
    PromptQueue,
    pick_prefill,
    prefill_locally,
)
from pdserve.router.slo import ValidSlo

# The largest share of a decode worker's time its prompt chunks are taken to use (beyond
# it the worker is overloaded, and the TPOT prediction is capped at 10x the decode step).
MAX_PREFILL_SHARE = 0.9


@dataclass(frozen=True)
class Placement:
    """One way to run a request, with what the cost model predicts for it."""

    decode: str
    prefill: str | None  # None: the decode worker prefills the prompt itself
    ttft_s: float  # from dispatch to the first token
    tpot_s: float  # D's mean step while the request decodes (Placer.tpot_s)
    second_token_s: float  # ttft + the KV transfer (remote prefill) + one decode step
    feasible: bool  # both predictions meet the request's own objectives
    score: float  # larger is better
    harm: int = 0  # requests on the decode worker whose TPOT objective this would break


@dataclass(frozen=True)
class Ask:
    """What a request asks of the pools: tokens to prefill, and its objectives."""

    num_tokens: int
    slo: ValidSlo
    # Per worker, the leading prompt tokens it is expected to hold in its prefix cache.
    cached: Mapping[str, int] = field(default_factory=dict)

    def cached_on(self, worker: str) -> int:
        return self.cached.get(worker, 0)

    @property
    def ttft_obj_s(self) -> float:
        return self.slo.ttft_ms / 1e3 if self.slo.ttft_ms else math.inf

    @property
    def tpot_obj_s(self) -> float:
        return self.slo.tpot_ms / 1e3 if self.slo.tpot_ms else math.inf


class Placer:
    """Predicts and ranks placements; holds no state of its own beyond its configuration."""

    def __init__(self, model: CostModel, max_num_seqs: int, block_size: int,
                 local_prefill: bool, clock: Callable[[], float] = time.monotonic,
                 rule: LocalPrefillRule | None = None) -> None:
        self.model = model
        self.rule = rule  # the static thresholds (overrides), where set
        self.clock = clock  # the router's: the loads' step times are on it
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.local_prefill = local_prefill  # decode workers may prefill prompts themselves

    def has_room(self, d: DecodeLoad, num_tokens: int) -> bool:
        """Whether the router's view of ``d`` has a seat and the blocks for the prompt's KV
        plus the first generated token (blocks unknown until ``d`` reports: the worker's
        reserve decides)."""
        return d.batch < self.max_num_seqs and (
            not d.known or d.free_blocks >= blocks_for(num_tokens + 1, self.block_size))

    def remote_ttft_s(self, p: PrefillLoad, num_tokens: int, extra_tokens: int = 0,
                      extra_attention: int = 0, cached: int = 0) -> float:
        """TTFT on prefill worker ``p`` with ``extra_tokens`` more queued ahead of it: what
        is left of the step it runs, then the prompts queued beyond that step and this one
        (with the tokens expected to reach ``p`` before the next step begins), of which
        ``p`` holds the first ``cached`` in its prefix cache."""
        m = self.model
        queued, attention = p.queued_tokens, p.queued_attention
        wait = 0.0
        if p.step_tokens > 0:
            running = min(p.step_tokens, m.max_batch_tokens)
            running_att = p.step_attention * running // p.step_tokens
            end = p.step_started + m.prefill_step_s(running, running_att, p.name)
            wait = max(0.0, end - self.clock())
            queued, attention = queued - running, attention - running_att
        queued, attention = self._joining(p, wait, num_tokens, queued, attention)
        return wait + m.queue_prefill_s(queued + extra_tokens, attention + extra_attention,
                                        num_tokens, p.name, cached)

    def local_ttft_s(self, d: DecodeLoad, num_tokens: int, extra_tokens: int = 0,
                     extra_attention: int = 0, cached: int = 0) -> float:
        """TTFT on decode worker ``d`` prefilling the prompt itself: what is left of the
        step it runs, then its queued prompt tokens beyond that step's chunk and this
        prompt (its first ``cached`` tokens in ``d``'s prefix cache), in mixed steps."""
        m = self.model
        queued, attention = d.queued_tokens, d.queued_attention
        wait = 0.0
        if d.batch > 0 or queued > 0:
            wait = max(0.0, d.reported_at + self.current_step_s(d) - self.clock())
            if queued > 0:
                chunk = min(queued, max(1, m.max_batch_tokens - d.batch))
                chunk_att = attention * chunk // queued
                queued, attention = queued - chunk, attention - chunk_att
        queued, attention = self._joining(d, wait, num_tokens, queued, attention)
        return wait + m.local_prefill_s(queued + extra_tokens, attention + extra_attention,
                                        num_tokens, d.batch, d.context, d.name, cached)

    def _joining(self, q: PromptQueue, wait_s: float, num_tokens: int, queued: int,
                 attention: int) -> tuple[int, int]:
        """``queued`` and ``attention`` with the prompt tokens expected to reach ``q`` in
        the next ``wait_s`` seconds added (they join the step this prompt waits for; their
        attention counted as if their prompts were this one's length)."""
        join = int(q.arrivals.rate(self.clock()) * wait_s)
        return max(0, queued) + join, max(0, attention) + join * num_tokens

    def step_s(self, d: DecodeLoad, num_tokens: int, local_tokens: int = 0) -> float:
        """D's step once the request joins, with ``local_tokens`` more prompt tokens for D
        to prefill itself (its own prompt, under local prefill)."""
        return self._step_s(d, d.batch + 1, d.context + num_tokens,
                            d.queued_tokens + local_tokens,
                            d.queued_attention + local_tokens * local_tokens)

    def tpot_s(self, d: DecodeLoad, num_tokens: int, local_tokens: int = 0) -> float:
        """The request's TPOT on D: D's mean step over its decode, at the batch it joins.
        A decode worker that prefills prompts mixes their chunks into its steps; with
        prompt tokens reaching D at a rate r (``DecodeLoad.arrivals``) and each costing
        b seconds, a step of decode time s carries r·T tokens on average, so
        T = s + b·r·T, T = s / (1 - b·r). ``local_tokens``: this request's own prompt,
        which joins the rate (over the rate's window)."""
        return self._tpot_s(d, d.batch + 1, d.context + num_tokens, local_tokens)

    def current_tpot_s(self, d: DecodeLoad) -> float:
        """The same for the requests D holds, its batch as it stands (0.0 while empty)."""
        if d.batch <= 0:
            return 0.0
        return self._tpot_s(d, d.batch, d.context, 0)

    def _tpot_s(self, d: DecodeLoad, batch: int, context: int, local_tokens: int) -> float:
        rate = d.arrivals.rate(self.clock()) + local_tokens / d.arrivals.window_s
        share = min(MAX_PREFILL_SHARE, self.model.prefill_token_s(d.name) * rate)
        return self.model.decode_step_s(batch, context, d.name) / (1.0 - share)

    def current_step_s(self, d: DecodeLoad) -> float:
        """D's step as its batch stands (0.0 while it holds nothing)."""
        if d.batch <= 0 and d.queued_tokens <= 0:
            return 0.0
        return self._step_s(d, d.batch, d.context, d.queued_tokens, d.queued_attention)

    def _step_s(self, d: DecodeLoad, batch: int, context: int, queued: int,
                attention: int) -> float:
        if queued <= 0:
            return self.model.decode_step_s(batch, context, d.name)
        chunk = min(queued, max(1, self.model.max_batch_tokens - batch))
        return self.model.mixed_step_s(batch, context, chunk,
                                       int(attention * chunk / queued), d.name)

    def options(self, ask: Ask, prefill: Iterable[PrefillLoad], decode: Iterable[DecodeLoad],
                held_tpot_s: Mapping[str, Sequence[float]], extra_tokens: int = 0,
                extra_attention: int = 0,
                usable: Callable[[str, str], bool] | None = None) -> list[Placement]:
        """Every placement on a decode worker with room, best first. ``held_tpot_s``: per
        decode worker, the TPOT objectives (seconds, sorted) of the requests it holds;
        ``extra_tokens``: prompt tokens served before this one (admission's view of the
        wait queue ahead of it); ``usable(prefill, decode)``: whether that pair's KV
        channel may carry a transfer (not while it is being reopened). Where the static
        thresholds are set (``rule``), they alone decide between a prefill worker and
        local prefill."""
        pools = list(prefill)
        n = ask.num_tokens
        local, remote = self.local_prefill or not pools, bool(pools)
        if pools and self.rule is not None and self.rule.enabled:
            local = prefill_locally(n, pick_prefill(pools), self.rule)
            remote = not local
        out = []
        for d in decode:
            if not self.has_room(d, n):
                continue
            held = held_tpot_s.get(d.name, ())
            tpot_now = self.current_tpot_s(d)
            on_d = ask.cached_on(d.name)  # not computed, nor sent, on this decode worker
            if remote:
                tpot = self.tpot_s(d, n)
                harm = breaks(held, tpot_now, tpot)
                step = self.step_s(d, n)
                for p in pools:
                    if usable is not None and not usable(p.name, d.name):
                        continue
                    ttft = self.remote_ttft_s(p, n, extra_tokens, extra_attention,
                                              ask.cached_on(p.name))
                    second = ttft + self.model.transfer_s(n - on_d, (p.name, d.name)) + step
                    out.append(self._rate(ask, d.name, p.name, ttft, tpot, second, harm))
            if local:
                ttft = self.local_ttft_s(d, n, extra_tokens, extra_attention, on_d)
                tpot = self.tpot_s(d, n, n - on_d)
                out.append(self._rate(ask, d.name, None, ttft, tpot,
                                      ttft + self.step_s(d, n, n - on_d),
                                      breaks(held, tpot_now, tpot)))
        out.sort(key=lambda o: (not o.feasible, o.harm, -o.score, o.second_token_s))
        return out

    def chosen_ttft_s(self, ask: Ask, prefill: Iterable[PrefillLoad],
                      decode: Iterable[DecodeLoad], held_tpot_s: Mapping[str, Sequence[float]],
                      extra_tokens: int = 0, extra_attention: int = 0) -> float:
        """The TTFT of the placement ``options`` ranks first (the one the scheduler takes),
        or, where no decode worker has room now, the lowest TTFT any worker could give."""
        prefill, decode = list(prefill), list(decode)
        opts = self.options(ask, prefill, decode, held_tpot_s, extra_tokens, extra_attention)
        if opts:
            return opts[0].ttft_s
        return self.best_ttft_s(ask, prefill, decode, extra_tokens, extra_attention)

    def best_ttft_s(self, ask: Ask, prefill: Iterable[PrefillLoad],
                    decode: Iterable[DecodeLoad], extra_tokens: int = 0,
                    extra_attention: int = 0) -> float:
        """The lowest TTFT any worker could give the request if dispatched now, seats
        aside, with ``extra_tokens`` (the requests served before it) queued ahead."""
        n = ask.num_tokens
        pools = list(prefill)
        best = [self.remote_ttft_s(p, n, extra_tokens, extra_attention, ask.cached_on(p.name))
                for p in pools]
        if self.local_prefill or not pools:
            best += [self.local_ttft_s(d, n, extra_tokens, extra_attention,
                                       ask.cached_on(d.name)) for d in decode]
        return min(best, default=math.inf)

    @staticmethod
    def _rate(ask: Ask, decode: str, prefill: str | None, ttft: float, step: float,
              second: float, harm: int) -> Placement:
        feasible = ttft <= ask.ttft_obj_s and step <= ask.tpot_obj_s
        room = [1.0 - pred / obj
                for pred, obj in ((ttft, ask.ttft_obj_s), (step, ask.tpot_obj_s))
                if math.isfinite(obj)]
        score = min(room) if room else -second
        return Placement(decode, prefill, ttft, step, second, feasible, score, harm)


def breaks(objectives: Sequence[float], step_now_s: float, step_s: float) -> int:
    """How many of ``objectives`` (TPOT, seconds, sorted ascending) a step of
    ``step_now_s`` meets and one of ``step_s`` does not: the requests a placement would push
    past their objective (those the step misses already are not its doing). Two bisections:
    the pump asks this of every waiting request on every decode worker."""
    if step_s <= step_now_s:
        return 0
    return bisect.bisect_left(objectives, step_s) - bisect.bisect_left(objectives, step_now_s)
