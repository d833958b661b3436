"""Event rates over a sliding window of recent time (the router's clock): requests finished
per second (admission's seat wait), prompt tokens dispatched per second to a worker (the
tokens expected to join its next prefill step)."""

from __future__ import annotations

from collections import deque

RATE_WINDOW_S = 10.0  # a rate is measured over this much recent time


class Rate:
    """Amount per second observed over the last ``window_s`` seconds."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._events: deque[tuple[float, float]] = deque()
        self._total = 0.0

    def observe(self, now: float, amount: float = 1.0) -> None:
        self._events.append((now, amount))
        self._total += amount
        self._trim(now)

    def rate(self, now: float) -> float:
        """0.0 until two events fell within the window (no rate to speak of); the span is
        at least half the window, so a burst of a few events does not read as a flood."""
        self._trim(now)
        if len(self._events) < 2:
            return 0.0
        span = max(now - self._events[0][0], 1e-3)
        return self._total / max(span, self.window_s / 2)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._total -= self._events.popleft()[1]
        if not self._events:
            self._total = 0.0
