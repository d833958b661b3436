"""Admission under the ``slo`` scheduler: a request whose predicted TTFT misses its
objective even if it is scheduled now is refused at once (RESOURCE_EXHAUSTED, the message
giving the predicted and the objective TTFT), unless its class is best-effort.

The prediction, from the request's arrival, for the placement the scheduler would give it
now (``Placer.chosen_ttft_s``, not the fastest one: a decode worker that could prefill the
prompt soonest is often not where it goes): the time it already waited (on the frontend),
then the longer of two waits, each followed by its own prefill:

- the prefill queue: the prompt tokens queued on the best worker plus those of the waiting
  requests the wait queue serves before it (``WaitQueue.ahead_of``);
- a decode seat: when the requests ahead of it outnumber the free seats, the extra ones
  wait for sequences to finish, at the rate they have been finishing (``router.rates.Rate``).

To that the prediction adds the class's TTFT residual (``TtftResidual``): measured minus
predicted TTFT of the class's recent requests, smoothed. It carries what the model does not
see (requests held back for others' TPOT objectives, the wait for decode room while the
decode worker is the bottleneck, a serving machine slower than its profile); under overload
measured TTFTs grow, the residual with them, and admission refuses what would be served
late. A refused request costs nothing; an admitted one that misses all the same is counted
by the SLO metrics. Backpressure thus follows what the deployment can serve in time, and
``max_waiting`` stays only as a bound on the router's memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pdserve.router.placement import Ask, Placer
from pdserve.router.policy import DecodeLoad, PrefillLoad
from pdserve.router.request import Request

RESIDUAL_ALPHA = 0.1  # the weight of each first token in its class's TTFT residual
RESIDUAL_HALF_LIFE_S = 2.0  # how fast a residual fades while its class is refused


class TtftResidual:
    """Per SLO class, measured minus predicted TTFT (seconds), smoothed over first tokens.

    The predictions it is compared with include the residual of their time, so each update
    moves it by ``alpha`` of the error left: r <- r + alpha * (measured - predicted). From
    the first refusal after a class's last first token, it fades towards 0 with a half-life
    of ``half_life_s``: a class whose requests are all refused sends no first tokens, and
    without the fade a residual learned in a burst would refuse that class for good. (A
    fade that ran all the time would keep the residual well short of a steady error at
    low rates, where first tokens are seconds apart.)"""

    def __init__(self, alpha: float = RESIDUAL_ALPHA,
                 half_life_s: float = RESIDUAL_HALF_LIFE_S) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        self.alpha = alpha
        self.half_life_s = half_life_s
        self._values: dict[str, float] = {}
        self._refusing_since: dict[str, float] = {}  # first refusal since the last token

    def get(self, slo_class: str, now: float) -> float:
        value = self._values.get(slo_class, 0.0)
        since = self._refusing_since.get(slo_class)
        if since is None:
            return value
        return value * 0.5 ** (max(0.0, now - since) / self.half_life_s)

    def refused(self, slo_class: str, now: float) -> None:
        """A request of the class was refused: the fade starts (if it has not)."""
        self._refusing_since.setdefault(slo_class, now)

    def observe(self, slo_class: str, predicted_s: float, measured_s: float,
                now: float) -> None:
        value = self.get(slo_class, now) + self.alpha * (measured_s - predicted_s)
        self._values[slo_class] = value
        self._refusing_since.pop(slo_class, None)


@dataclass(frozen=True)
class Verdict:
    """Admission's answer: the predicted TTFT (seconds from arrival) and, if refused, why."""

    predicted_ttft_s: float
    refusal: str = ""


def predict_ttft(placer: Placer, req: Request, ahead: Sequence[Request],
                 prefill: Iterable[PrefillLoad], decode: Iterable[DecodeLoad],
                 finish_rate: float, now: float,
                 held_tpot_s: Mapping[str, Sequence[float]] | None = None,
                 cached: Mapping[str, int] | None = None) -> float:
    """``req``'s TTFT from its arrival if dispatched behind ``ahead`` to the placement the
    scheduler would give it (``Placer.chosen_ttft_s``; see the module docstring).
    ``held_tpot_s``: per decode worker, the TPOT objectives of the requests it holds (the
    placements' harm, which decides the choice); ``cached``: per worker, the prompt tokens
    it is expected to hold in its prefix cache."""
    prefill, decode = list(prefill), list(decode)
    held = held_tpot_s or {}
    ask = Ask(len(req.prompt_ids) + len(req.output_ids), req.slo, dict(cached or {}))
    lengths = [len(r.prompt_ids) + len(r.output_ids) for r in ahead]
    own = placer.chosen_ttft_s(ask, prefill, decode, held)
    behind_queue = own if not lengths else placer.chosen_ttft_s(
        ask, prefill, decode, held, sum(lengths), sum(n * n for n in lengths))
    free = sum(max(0, placer.max_num_seqs - d.batch) for d in decode)
    short = len(ahead) + 1 - free
    seat_wait = short / finish_rate if short > 0 and finish_rate > 0 else 0.0
    return (now - req.arrival) + max(behind_queue, seat_wait + own)


def judge(req: Request, predicted_ttft_s: float) -> Verdict:
    """Refuse ``req`` if the prediction misses its TTFT objective and its class is not
    best-effort."""
    objective = req.ttft_slo_s
    if objective is None or req.slo.best_effort or predicted_ttft_s <= objective \
            or not math.isfinite(objective):
        return Verdict(predicted_ttft_s)
    return Verdict(predicted_ttft_s, (
        f"predicted TTFT {predicted_ttft_s * 1e3:.0f} ms exceeds the objective "
        f"{objective * 1e3:.0f} ms (SLO class {req.slo.class_name}); retry later or relax "
        "slo.ttft_ms"))
