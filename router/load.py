"""What the router sees of the load, as the autoscaler reads it: arrivals and prompt tokens
per second, output lengths and SLO attainment of the requests that finished recently, what
waits, and how full the pools are. Kept over a sliding window of the router's clock; a
``LoadSnapshot`` is one reading of it (pure data: it crosses Ray to the autoscaler)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdserve.router.rates import Rate
from pdserve.router.request import Request

LOAD_WINDOW_S = 30.0  # the autoscaler's signals cover this much recent time


@dataclass(frozen=True)
class LoadSnapshot:
    """One reading of the load. Attainment, per SLO class, is the share of the class's
    finished requests with an objective that met it; ``ttft_attainment`` and
    ``tpot_attainment`` are the worst class's (None: none finished with one in the
    window)."""

    arrival_rate: float = 0.0  # requests admitted per second
    prompt_token_rate: float = 0.0  # their prompt tokens per second
    mean_output_tokens: float = 0.0  # of the requests finished in the window (0: none)
    mean_context_tokens: float = 0.0  # prompt + output of those requests
    waiting: int = 0  # requests queued for a lease
    queued_prompt_tokens: int = 0  # handed to a worker to prefill, not prefilled yet
    decode_batch: int = 0  # sequences on the serving decode workers
    kv_usage: float = 0.0  # the fullest serving decode worker's KV cache (0..1)
    ttft_attainment: float | None = None
    tpot_attainment: float | None = None
    ttft_by_class: dict[str, float] = field(default_factory=dict)
    tpot_by_class: dict[str, float] = field(default_factory=dict)
    serving: dict[str, int] = field(default_factory=dict)  # role -> workers placed on
    draining: dict[str, int] = field(default_factory=dict)
    workers: tuple[str, ...] = ()  # every worker the router holds (serving or draining)


class LoadWindow:
    """Arrivals and finishes over the last ``window_s`` seconds."""

    def __init__(self, window_s: float = LOAD_WINDOW_S) -> None:
        self.window_s = window_s
        self.arrivals = Rate(window_s)
        self.prompt_tokens = Rate(window_s)
        # (time, SLO class, output tokens, context tokens, ttft met, tpot met); met: None =
        # no objective
        self._finished: deque[tuple[float, str, int, int, bool | None, bool | None]] = deque()

    def arrived(self, now: float, prompt_tokens: int) -> None:
        self.arrivals.observe(now)
        self.prompt_tokens.observe(now, prompt_tokens)

    def finished(self, now: float, slo_class: str, output_tokens: int, context_tokens: int,
                 ttft_met: bool | None, tpot_met: bool | None) -> None:
        self._finished.append((now, slo_class, output_tokens, context_tokens, ttft_met,
                               tpot_met))
        self._trim(now)

    def request_finished(self, req: Request, now: float) -> None:
        """``req`` finished: its output and context, and whether it met its objectives."""
        n = len(req.output_ids)
        ttft, tpot = req.ttft_slo_s, req.tpot_slo_s
        mean_tpot = (req.t_last - req.t_first) / (n - 1) if n > 1 else 0.0
        self.finished(
            now, req.slo.class_name, n, len(req.prompt_ids) + n,
            None if ttft is None or not req.t_first else req.t_first - req.arrival <= ttft,
            None if tpot is None or n < 2 else mean_tpot <= tpot)

    def reading(self, now: float) -> LoadSnapshot:
        """The window's share of a ``LoadSnapshot`` (the pools fill in the rest)."""
        self._trim(now)
        done = list(self._finished)
        n = len(done)
        ttft, tpot = _by_class(done, 4), _by_class(done, 5)
        return LoadSnapshot(
            arrival_rate=self.arrivals.rate(now),
            prompt_token_rate=self.prompt_tokens.rate(now),
            mean_output_tokens=sum(d[2] for d in done) / n if n else 0.0,
            mean_context_tokens=sum(d[3] for d in done) / n if n else 0.0,
            ttft_attainment=min(ttft.values(), default=None),
            tpot_attainment=min(tpot.values(), default=None),
            ttft_by_class=ttft, tpot_by_class=tpot,
        )

    def _trim(self, now: float) -> None:
        while self._finished and self._finished[0][0] < now - self.window_s:
            self._finished.popleft()


def _by_class(done: list[tuple[float, str, int, int, bool | None, bool | None]],
              field_index: int) -> dict[str, float]:
    """Per SLO class, the share of its judged requests (``field_index``: ttft or tpot met)
    that met the objective; classes with none judged are left out."""
    judged: dict[str, list[bool]] = {}
    for d in done:
        met = d[field_index]
        if met is not None:
            judged.setdefault(d[1], []).append(bool(met))
    return {c: sum(m) / len(m) for c, m in judged.items()}
