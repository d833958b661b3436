"""Per-request sampling parameters and the stop conditions a worker can check on its own.

Stop *strings* need detokenized text and are the router's job; token-level stops (EOS,
stop_token_ids, max_tokens) are checked by the worker that samples the token, so a
sequence stops on the very step that produced its last token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """What a worker needs to sample and stop one sequence.

    ``max_tokens`` counts every generated token of the request, including tokens generated
    before a preemption; ``eos_token_ids`` are the model's, filled in by the router.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= -1, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def finish_reason(params: SamplingParams, token: int, num_generated: int) -> str | None:
    """The finish reason after ``token`` became the ``num_generated``-th output token, or
    None if the sequence goes on."""
    if token in params.stop_token_ids:
        return "stop"
    if not params.ignore_eos and token in params.eos_token_ids:
        return "stop"
    if num_generated >= params.max_tokens:
        return "length"
    return None
