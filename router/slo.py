"""A request's latency objectives, as the router and its metrics judge them.

A plain dataclass: validation (the protobuf edge) builds it from a ``GenerateRequest``'s
``slo`` field, and the request state machine and the metrics take it without knowing the
wire format.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ValidSlo:
    """Latency objectives in milliseconds; None = no objective."""

    ttft_ms: float | None
    tpot_ms: float | None
