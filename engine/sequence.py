"""Per-request sampling parameters and the stop conditions a worker can check on its own.

Stop *strings* need detokenized text and are the router's job; token-level stops (EOS,
stop_token_ids, max_tokens) are checked by the worker that samples the token, so a
sequence stops on the very step that produced its last token. Before ``min_tokens`` tokens
are out no stop applies (the sampler masks EOS and stop_token_ids; the router skips stop
strings), only max_tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI's range)
MAX_TOP_LOGPROBS = 20  # alternatives reported per token (OpenAI's and vLLM's default bound)


@dataclass(frozen=True)
class SamplingParams:
    """What a worker needs to sample and stop one sequence.

    ``max_tokens`` counts every generated token of the request, including tokens generated
    before a preemption; ``eos_token_ids`` are the model's, filled in by the router.

    The penalties follow vLLM: ``repetition_penalty`` (> 0, 1 = off) is the HF/CTRL form
    over prompt and output tokens (a seen token's logit is divided by it when positive,
    multiplied when not); ``presence_penalty`` and ``frequency_penalty`` (in [-2, 2], 0 =
    off) are OpenAI's, over output tokens only (``logit -= presence * (count > 0) +
    frequency * count``). ``min_p`` (in [0, 1], 0 = off) drops tokens less likely than
    ``min_p`` times the most likely one. ``logprobs``: report each sampled token's logprob
    and its ``top_logprobs`` best alternatives (``engine.logits_processors``).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= -1, got {self.top_k}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be finite and > 0, "
                             f"got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], "
                             f"got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        """Whether sampling needs the sequence's tokens (prompt and output) to count."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def stop_ids(self) -> tuple[int, ...]:
        """The tokens that end the sequence (masked while under min_tokens)."""
        if self.ignore_eos:
            return self.stop_token_ids
        return self.stop_token_ids + self.eos_token_ids


def finish_reason(params: SamplingParams, token: int, num_generated: int) -> str | None:
    """The finish reason after ``token`` became the ``num_generated``-th output token, or
    None if the sequence goes on."""
    if num_generated < params.min_tokens:  # (then < max_tokens too)
        return None
    if token in params.stop_token_ids:
        return "stop"
    if not params.ignore_eos and token in params.eos_token_ids:
        return "stop"
    if num_generated >= params.max_tokens:
        return "length"
    return None
