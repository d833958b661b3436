"""How many workers each pool needs, from the live load and the calibrated cost model
(the one the router places with and ``pdserve tune`` simulates with), and when to change
a pool's size without flapping. Pure: ``cluster.scaling`` runs it against Ray.

Sizing, per pool, in worker-seconds of work per second:

- prefill: the prompt tokens arriving per second over what one worker prefills per second
  in full steps of ``max_batch_tokens`` (prompts of the mean arriving length);
- decode: the output tokens asked for per second (arrivals times the mean output length of
  the requests that finished lately) over what one worker decodes per second at the largest
  batch whose step still meets the tightest TPOT objective;
- colocated: both, on the one pool of replicas.

Each need is divided by ``target_utilization`` (headroom) and rounded up. The live signals
then correct it, since a model can be wrong: a pool whose objective's attainment fell below
``attainment_floor`` while it still has work (TTFT: the prefill pool, prompts queued; TPOT:
the decode pool, sequences running), requests waiting for a decode seat, or a decode
worker's KV above ``kv_high`` grow that pool by one at least.

Pacing (``Pacer``): a pool grows at once to what it needs, then not again for
``scale_up_cooldown_s``; it shrinks by one worker only after it looked too big for
``scale_down_delay_s`` in a row, and then no more often than that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.cluster.autoscale_config import AutoscaleConfig
from pdserve.router.cost_model import CostModel
from pdserve.router.load import LoadSnapshot


@dataclass(frozen=True)
class PoolShape:
    """What sizing reads of the serve config."""

    colocated: bool
    max_batch_tokens: int
    max_num_seqs: int
    tpot_objective_s: float | None  # the tightest TPOT objective of the SLO classes

    @property
    def roles(self) -> tuple[str, ...]:
        return ("decode",) if self.colocated else ("prefill", "decode")


@dataclass(frozen=True)
class Capacity:
    """What one worker does per second, by the cost model (inf: no prediction)."""

    prefill_tokens_s: float
    decode_tokens_s: float
    decode_batch: int  # the batch the decode figure assumes


def capacity(model: CostModel, shape: PoolShape, prompt_len: float, context: float,
             utilization: float) -> Capacity:
    b_tokens = shape.max_batch_tokens
    length = max(prompt_len, 1.0)
    step = model.prefill_step_s(b_tokens, int(b_tokens * min(length, b_tokens)))
    prefill = b_tokens / step if step > 0 else math.inf
    budget = shape.tpot_objective_s * utilization if shape.tpot_objective_s else math.inf
    best, best_step = 1, model.decode_step_s(1, int(context))
    for b in range(2, shape.max_num_seqs + 1):
        s = model.decode_step_s(b, int(b * context))
        if s > budget:
            break
        best, best_step = b, s
    decode = best / best_step if best_step > 0 else math.inf
    return Capacity(prefill, decode, best)


def needed(load: LoadSnapshot, model: CostModel, shape: PoolShape,
           cfg: AutoscaleConfig) -> dict[str, int]:
    """Workers each pool needs now, within its bounds (see the module's docstring)."""
    rate = load.arrival_rate
    prompt_len = load.prompt_token_rate / rate if rate > 0 else 0.0
    out_len = load.mean_output_tokens
    context = load.mean_context_tokens or prompt_len + out_len / 2
    cap = capacity(model, shape, prompt_len, context, cfg.target_utilization)
    prefill_work = load.prompt_token_rate / cap.prefill_tokens_s
    decode_work = rate * out_len / cap.decode_tokens_s
    util = cfg.target_utilization
    if shape.colocated:
        need = {"decode": math.ceil((prefill_work + decode_work) / util - 1e-9)}
    else:
        need = {"prefill": math.ceil(prefill_work / util - 1e-9),
                "decode": math.ceil(decode_work / util - 1e-9)}
    ttft_pool = "decode" if shape.colocated else "prefill"

    def at_least_one_more(role: str) -> None:
        need[role] = max(need[role], load.serving.get(role, 0) + 1)

    # Attainment speaks of the requests that finished in the window; it grows a pool only
    # while that pool still has work (once the load is gone, its misses ask for nothing).
    floor = cfg.attainment_floor
    decoding = load.decode_batch > 0 or load.waiting > 0
    prefilling = load.queued_prompt_tokens > 0 or load.waiting > 0
    if load.ttft_attainment is not None and load.ttft_attainment < floor \
            and (decoding if shape.colocated else prefilling):
        at_least_one_more(ttft_pool)
    if (load.tpot_attainment is not None and load.tpot_attainment < floor and decoding) \
            or load.waiting > 0 or load.kv_usage > cfg.kv_high:
        at_least_one_more("decode")
    out = {}
    for role in shape.roles:
        lo, hi = cfg.bounds(role)
        out[role] = min(max(need[role], lo), hi)
    return out


class Pacer:
    """Turns what the pools need into changes, with cooldown and delay (no flapping)."""

    def __init__(self, cfg: AutoscaleConfig) -> None:
        self.cfg = cfg
        self.last_change: dict[str, float] = {}
        self.low_since: dict[str, float] = {}

    def moves(self, need: dict[str, int], current: dict[str, int],
              now: float) -> dict[str, int]:
        """Per role: +n workers to start, -1 to drain, or 0. ``current`` counts the
        workers serving and starting (not those draining)."""
        out: dict[str, int] = {}
        for role, n in need.items():
            have = current.get(role, 0)
            since_change = now - self.last_change.get(role, -math.inf)
            move = 0
            if n > have:
                self.low_since.pop(role, None)
                if since_change >= self.cfg.scale_up_cooldown_s:
                    move = n - have
            elif n < have:
                low = self.low_since.setdefault(role, now)
                delay = self.cfg.scale_down_delay_s
                if now - low >= delay and since_change >= delay:
                    move = -1
                    self.low_since[role] = now
            else:
                self.low_since.pop(role, None)
            if move:
                self.last_change[role] = now
            out[role] = move
        return out
