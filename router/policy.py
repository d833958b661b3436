"""Which workers a request goes to. Pure functions over the router's view of the pools.

The router tracks, per worker, what it last reported (decode: running sequences, free
blocks) and what it has handed out since (prefill: prompt tokens queued). The order below is
the order in which decode workers are asked for a lease: the first that grants one wins.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class PrefillLoad:
    """The router's running estimate of one prefill worker's queue."""

    name: str
    queued_tokens: int = 0
    draining: bool = False


@dataclass
class DecodeLoad:
    """What one decode worker last reported, plus leases granted since."""

    name: str
    num_running: int = 0
    num_free_blocks: int = 0
    kv_usage: float = 0.0
    draining: bool = False


def pick_prefill(workers: Iterable[PrefillLoad]) -> PrefillLoad:
    """The prefill worker with the fewest queued prompt tokens (ties: first listed)."""
    live = [w for w in workers if not w.draining]
    if not live:
        raise LookupError("no prefill worker is accepting work")
    return min(live, key=lambda w: w.queued_tokens)


def decode_order(workers: Iterable[DecodeLoad]) -> list[DecodeLoad]:
    """Decode workers to ask for a lease, most free KV first, then fewest running."""
    live = [w for w in workers if not w.draining]
    return sorted(live, key=lambda w: (w.kv_usage, w.num_running))
