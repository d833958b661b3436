"""One request's state on the router, and the text side of streaming: incremental
detokenization and stop strings (which never leak into the streamed text)."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.messages import Lease, TokenLogprobs
from pdserve.engine.sequence import SamplingParams
from pdserve.engine.tokenizer import IncrementalDetokenizer
from pdserve.router.slo import ValidSlo


class State(enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    DECODING = "decoding"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclass(frozen=True)
class Chunk:
    """What the request's client stream gets next: new token ids and text, and, on the last chunk,
    how the request ended (``error`` set: the stream ends with that gRPC status)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    error: tuple[str, str] | None = None  # (grpc status name, message)
    logprobs: list[TokenLogprobs] | None = None  # aligned with token_ids, when asked for


@dataclass(eq=False)
class Request:
    """A request from admission to its last chunk (compared by identity: an entity, whose
    fields change as it runs)."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stop: tuple[str, ...]
    slo: ValidSlo
    arrival: float
    detok: IncrementalDetokenizer
    state: State = State.QUEUED
    output_ids: list[int] = field(default_factory=list)
    frontend: int = 0  # the gRPC frontend whose client stream this request answers
    parent: str = ""  # n > 1: the id of the call this child answers (router.fanout)
    index: int = 0  # n > 1: which of its n choices
    lease: Lease | None = None
    releasing: Any = None  # a failed attempt's lease abort (awaitable) still under way
    deadline_timer: asyncio.TimerHandle | None = None  # cancelled when the request ends
    prefill_worker: str = ""
    # The hashes of the full blocks of prompt + output, as far as computed (router.prefix_index)
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    attempts: int = 0  # dispatches so far
    failures: int = 0  # attempts that failed (a preemption is not a failure)
    order: int = 0  # admission number (Router.admit): wait-queue ties; the decode workers
    # preempt by it
    predicted_ttft_s: float | None = None  # at admission, from arrival (slo scheduler)
    predicted_tpot_s: float | None = None  # at the last dispatch
    queued_at: float = 0.0
    # timing (router clock, monotonic)
    t_first: float = 0.0
    t_last: float = 0.0
    queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0  # KV transfer seconds of every attempt, in the final timing
    transfer_observed: bool = False  # in the per-request transfer histogram (RequestMetrics)
    early: list[tuple[int, str | None, TokenLogprobs | None]] = field(default_factory=list)
    awaiting_first: bool = True
    # text
    text: str = ""
    sent_chars: int = 0
    stops_from: int = 0  # stop strings are looked for from here on (text before min_tokens)

    @property
    def done(self) -> bool:
        return self.state in (State.FINISHED, State.ABORTED, State.FAILED)

    @property
    def ttft_slo_s(self) -> float | None:
        return self.slo.ttft_ms / 1e3 if self.slo.ttft_ms else None

    @property
    def tpot_slo_s(self) -> float | None:
        return self.slo.tpot_ms / 1e3 if self.slo.tpot_ms else None

    def add_tokens(self, ids: list[int]) -> tuple[str, str | None]:
        """Detokenize ``ids``; returns (text safe to stream now, stop string hit or None).

        Text that could still turn into a stop string is held back; on a hit, the text is
        cut where the stop string begins. Before ``min_tokens`` tokens are out, stop strings
        do not apply (vLLM's rule): that text streams whole, and no stop string is looked for
        in it later.
        """
        self.output_ids.extend(ids)
        self.text += self.detok.add(ids)
        if self.stop and len(self.output_ids) < self.sampling.min_tokens:
            out = self._take(len(self.text))
            self.stops_from = self.sent_chars
            return out, None
        if self.stop:
            window = max(len(s) for s in self.stop)
            start = max(self.stops_from, self.sent_chars - window + 1)
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                cut, stop = min(hits)
                self.text = self.text[:cut]
                return self._take(len(self.text)), stop
            return self._take(len(self.text) - _held_back(self.text, self.stop)), None
        return self._take(len(self.text)), None

    def flush(self) -> str:
        """All text not yet streamed (at the end, nothing is held back: an unfinished
        character at the very end comes out as the tokenizer decodes it)."""
        self.text += self.detok.flush()
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        upto = max(upto, self.sent_chars)
        out = self.text[self.sent_chars:upto]
        self.sent_chars = upto
        return out


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
