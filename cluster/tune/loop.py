"""Simulated time for ``pdserve tune``: an asyncio event loop whose clock is a number that
jumps from one scheduled event to the next.

The router runs on asyncio (tasks, awaited worker calls, ``call_later`` deadline timers) and
reads its clock through ``Router(clock=...)``; the simulated workers schedule their steps
and messages with ``call_later``. On :class:`SimLoop` all of it runs unchanged: ``time()``
is the simulated clock, and where a real loop would block in its selector until the next
timer is due, this one moves the clock to that timer at once (the ``looptime`` approach).
Nothing waits on the wall clock, so an hour of serving simulates in as long as its events
take to handle, and a run is deterministic: the same inputs give the same events in the
same order.

The loop handles no I/O: a simulation opens no sockets and starts no threads. When nothing
is ready and nothing is scheduled the simulation cannot go on, and ``select`` raises
:class:`Stalled` rather than wait forever.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any


class Stalled(RuntimeError):
    """The simulation waits on something no scheduled event will bring."""


class _Jump(selectors.DefaultSelector):
    """The loop's selector: registers the loop's self-pipe like any selector, but a
    ``select`` with a timeout moves the simulated clock forward by it instead of waiting."""

    def __init__(self, loop: SimLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        if timeout is None:
            raise Stalled("the simulation stalled: nothing is ready and nothing is scheduled")
        if timeout > 0:
            self._loop.advance(timeout)
        return []


class SimLoop(asyncio.SelectorEventLoop):
    """An event loop on a simulated clock, starting at ``start`` seconds."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        super().__init__(_Jump(self))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward (the selector does, when the next timer is not due)."""
        self._now += seconds
