"""Placement under the ``slo`` scheduler: for a request, every (prefill worker or local
prefill, decode worker) choice with its predicted TTFT and TPOT, best first.

Predictions come from the cost model (``router.cost_model``) over the router's view of the
pools (``router.policy``'s loads):

- TTFT on a prefill worker P: the prompt tokens queued on P, then this prompt, in steps of
  ``max_batch_tokens`` (pdserve streams the first token the moment P samples it, before the
  KV moves, so the transfer is not part of TTFT; it delays the second token).
- TTFT with local prefill on a decode worker D: D's queued prompt tokens and this prompt, in
  mixed steps of what D's decode batch leaves of the step's token budget.
- TPOT on D: D's step at the batch it would join (the sequences it runs or has promised a
  seat to, plus this one), mixed with the prompt chunks D still has to prefill locally.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pdserve.engine.config import blocks_for
from pdserve.router.cost_model import CostModel
from pdserve.router.policy import DecodeLoad, PrefillLoad
from pdserve.router.slo import ValidSlo


@dataclass(frozen=True)
class Placement:
    """One way to run a request, with what the cost model predicts for it."""

    decode: str
    prefill: str | None  # None: the decode worker prefills the prompt itself
    ttft_s: float  # from dispatch to the first token
    tpot_s: float
    second_token_s: float  # ttft + the KV transfer (remote prefill) + one decode step
    feasible: bool  # both predictions meet the request's own objectives
    score: float  # larger is better
    harm: int = 0  # requests on the decode worker whose TPOT objective this would break


@dataclass(frozen=True)
class Ask:
    """What a request asks of the pools: tokens to prefill, and its objectives."""

    num_tokens: int
    slo: ValidSlo

    @property
    def ttft_obj_s(self) -> float:
        return self.slo.ttft_ms / 1e3 if self.slo.ttft_ms else math.inf

    @property
    def tpot_obj_s(self) -> float:
        return self.slo.tpot_ms / 1e3 if self.slo.tpot_ms else math.inf


class Placer:
    """Predicts and ranks placements; holds no state of its own beyond its configuration."""

    def __init__(self, model: CostModel, max_num_seqs: int, block_size: int,
                 local_prefill: bool) -> None:
        self.model = model
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
                      extra_attention: int = 0) -> float:
        """TTFT on prefill worker ``p`` with ``extra_tokens`` more queued ahead of it."""
        return self.model.queue_prefill_s(p.queued_tokens + extra_tokens,
                                          p.queued_attention + extra_attention, num_tokens,
                                          p.name)

    def local_ttft_s(self, d: DecodeLoad, num_tokens: int) -> float:
        return self.model.local_prefill_s(d.queued_tokens, d.queued_attention, num_tokens,
                                          d.batch, d.context, d.name)

    def step_s(self, d: DecodeLoad, num_tokens: int, local_tokens: int = 0) -> float:
        """D's step once the request joins, with ``local_tokens`` more prompt tokens for D
        to prefill itself (its own prompt, under local prefill)."""
        return self._step_s(d, d.batch + 1, d.context + num_tokens,
                            d.queued_tokens + local_tokens,
                            d.queued_attention + local_tokens * local_tokens)

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
                held_tpot_s: Mapping[str, Sequence[float]]) -> list[Placement]:
        """Every placement on a decode worker with room, best first. ``held_tpot_s``: per
        decode worker, the TPOT objectives (seconds, sorted) of the requests it holds."""
        pools = list(prefill)
        n = ask.num_tokens
        out = []
        for d in decode:
            if not self.has_room(d, n):
                continue
            held = held_tpot_s.get(d.name, ())
            now_s = self.current_step_s(d)
            if pools:
                step = self.step_s(d, n)
                harm = breaks(held, now_s, step)
                for p in pools:
                    ttft = self.remote_ttft_s(p, n)
                    second = ttft + self.model.transfer_s(n, (p.name, d.name)) + step
                    out.append(self._rate(ask, d.name, p.name, ttft, step, second, harm))
            if self.local_prefill or not pools:
                ttft = self.local_ttft_s(d, n)
                step = self.step_s(d, n, n)
                out.append(self._rate(ask, d.name, None, ttft, step, ttft + step,
                                      breaks(held, now_s, step)))
        out.sort(key=lambda o: (not o.feasible, o.harm, -o.score, o.second_token_s))
        return out

    def best_ttft_s(self, ask: Ask, prefill: Iterable[PrefillLoad],
                    decode: Iterable[DecodeLoad], extra_tokens: int = 0,
                    extra_attention: int = 0) -> float:
        """The lowest TTFT any worker could give the request if dispatched now, seats
        aside, with ``extra_tokens`` (the requests served before it) queued ahead."""
        n = ask.num_tokens
        pools = list(prefill)
        best = [self.remote_ttft_s(p, n, extra_tokens, extra_attention) for p in pools]
        if self.local_prefill or not pools:
            for d in decode:
                best.append(self.model.local_prefill_s(
                    d.queued_tokens + extra_tokens, d.queued_attention + extra_attention, n,
                    d.batch, d.context, d.name))
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
