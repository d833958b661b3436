"""The first-token report: what a worker tells the router the moment it samples a request's
first token, after the prompt's last chunk ran (the request's TTFT ends there).

The prefill worker sends one for every prompt it prefills; a decode worker for each prompt it
prefills itself (colocated mode, conditional disaggregation).
"""

from __future__ import annotations

from collections.abc import Callable

from pdserve.engine.messages import FirstToken, StepTiming, TokenLogprobs
from pdserve.engine.sequence import SamplingParams, finish_reason


class FirstTokenReporter:
    """Builds one worker's ``FirstToken`` messages and hands each to ``send`` (the router's
    ``on_first_token`` call: the engine knows nothing of how it travels)."""

    def __init__(self, worker: str, send: Callable[[FirstToken], object]) -> None:
        self.worker = worker
        self._send = send

    def report(
        self, request_id: str, transfer_id: int, token: int, sampling: SamplingParams,
        num_generated: int, *, arrived: float, started: float, now: float,
        step: StepTiming | None = None, num_tokens: int = 0, cached_tokens: int = 0,
        logprobs: TokenLogprobs | None = None,
    ) -> str | None:
        """Report ``token`` for the attempt leased as ``transfer_id``; returns its finish
        reason (None: the request goes on). ``num_generated`` counts the request's output
        tokens with this one; the request waited from ``arrived`` to ``started`` and was
        prefilled from ``started`` to ``now``; ``step`` is the step that ran its last chunk
        (see ``FirstToken.step``); of its ``num_tokens`` prompt tokens, ``cached_tokens``
        were found in the prefix cache (not computed); ``logprobs``: the token's, when the
        request asked."""
        reason = finish_reason(sampling, token, num_generated)
        self._send(FirstToken(
            self.worker, request_id, transfer_id, token, reason,
            queue_s=started - arrived, prefill_s=now - started, step=step,
            num_tokens=num_tokens, cached_tokens=cached_tokens, logprobs=logprobs,
        ))
        return reason
