"""AutoscaleConfig: the pools' bounds and the autoscaler's pacing, each knob defined once
(flags of `pdserve serve` and keys of its YAML, like ``ServeConfig``'s own)."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.cluster.knobs import check_values, knob

AUTOSCALING = "autoscaling"
AUTOSCALE_GROUP = {AUTOSCALING: "--autoscale: each pool sized from the live load and the "
                                "cost model, between its bounds (nodes come from the Ray "
                                "autoscaler; workers drain before they go)"}


@dataclass(frozen=True)
class AutoscaleConfig:
    """Bounds per pool (in colocated mode the decode pool is the replicas) and pacing."""

    autoscale: bool = knob(False, "size the pools from the load while serving", AUTOSCALING)
    min_prefill: int = knob(1, "fewest prefill workers", AUTOSCALING, minimum=1)
    max_prefill: int = knob(4, "most prefill workers", AUTOSCALING, minimum=1)
    min_decode: int = knob(1, "fewest decode workers (replicas in colocated mode)",
                           AUTOSCALING, minimum=1)
    max_decode: int = knob(4, "most decode workers (replicas in colocated mode)",
                           AUTOSCALING, minimum=1)
    target_utilization: float = knob(
        0.7, "the share of a worker's capacity the sizing plans to use (the rest is "
        "headroom for bursts and the TTFT objective)", AUTOSCALING, above=0.0, maximum=1.0)
    attainment_floor: float = knob(
        0.9, "below this SLO attainment (TTFT: prefill pool, TPOT: decode pool) over the "
        "last window, the pool grows by one even if the cost model says it suffices",
        AUTOSCALING, minimum=0.0, maximum=1.0)
    kv_high: float = knob(0.9, "a decode worker's KV usage above which the decode pool "
                          "grows by one", AUTOSCALING, above=0.0, maximum=1.0)
    autoscale_interval_s: float = knob(5.0, "seconds between two sizing decisions",
                                       AUTOSCALING, above=0.0)
    scale_up_cooldown_s: float = knob(30.0, "seconds after a pool changed before it grows "
                                      "again", AUTOSCALING, minimum=0.0)
    scale_down_delay_s: float = knob(
        60.0, "seconds a pool must look too big before one worker drains (and between two "
        "drains)", AUTOSCALING, minimum=0.0)
    drain_timeout_s: float = knob(60.0, "seconds a draining worker's requests may take to "
                                  "finish before they migrate", AUTOSCALING, minimum=0.0)
    worker_start_timeout_s: float = knob(
        900.0, "seconds a new worker may wait for its node and warm up before the "
        "autoscaler gives up on it", AUTOSCALING, above=0.0)

    def __post_init__(self) -> None:
        check_values(self)
        for pool in ("prefill", "decode"):
            lo, hi = getattr(self, f"min_{pool}"), getattr(self, f"max_{pool}")
            if hi < lo:
                raise ValueError(f"max_{pool} ({hi}) must be >= min_{pool} ({lo})")

    def bounds(self, role: str) -> tuple[int, int]:
        return getattr(self, f"min_{role}"), getattr(self, f"max_{role}")
