"""Ray actor calls between the simulated router and workers.

A real worker handle is called as ``handle.method.remote(*args)`` and returns an awaitable
(an ObjectRef) that the caller awaits or drops; the workers reach the router the same way.
:class:`Handle` gives the router and the simulated workers that interface over a
:class:`Network` on the simulated loop: a call runs on its target ``latency_s`` after it is
made, calls on one (caller, target) link run in the order they were made (as Ray runs a
caller's calls to one actor), and an awaited reply arrives ``latency_s`` after the call ran.

A call that raises is a defect of the simulated deployment (or of the code under it): the
network keeps the first such error and stops the loop, and the simulation re-raises it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

from pdserve.cluster.tune.settings import CALL_LATENCY_S


class Reply:
    """What ``remote`` returns: awaitable like an ObjectRef. Its future exists only once
    someone awaits it, so that the many calls nobody awaits (reports, submits, aborts) cost
    no event of their own."""

    __slots__ = ("_future", "_loop", "_ready_at", "_value")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[Any] | None = None
        self._ready_at: float | None = None  # when the reply reaches the caller
        self._value: Any = None

    def __await__(self) -> Generator[Any, None, Any]:
        if self._future is None:
            self._future = self._loop.create_future()
            if self._ready_at is not None:
                self._loop.call_at(self._ready_at, self._resolve)
        return self._future.__await__()

    def ready(self, value: Any, at: float) -> None:
        self._value, self._ready_at = value, at
        if self._future is not None:
            self._loop.call_at(at, self._resolve)

    def _resolve(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(self._value)


_Call = tuple[Callable[..., Any], tuple[Any, ...], Reply]


class Network:
    """Delivers calls between the processes of one simulated deployment."""

    def __init__(self, loop: asyncio.AbstractEventLoop, latency_s: float = CALL_LATENCY_S) -> None:
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s}")
        self.loop = loop
        self.latency_s = latency_s
        self.error: BaseException | None = None
        self._links: dict[tuple[str, str], deque[_Call]] = {}

    def handle(self, caller: str, target_name: str, target: object) -> Handle:
        """``target`` as ``caller`` holds it."""
        return Handle(self, (caller, target_name), target)

    def send(self, link: tuple[str, str], fn: Callable[..., Any], args: tuple[Any, ...]) -> Reply:
        reply = Reply(self.loop)
        self._links.setdefault(link, deque()).append((fn, args, reply))
        # Each timer delivers the oldest call on its link: calls of one link with the same
        # due time keep their order whatever order the loop runs those timers in.
        self.loop.call_later(self.latency_s, self._deliver, link)
        return reply

    def _deliver(self, link: tuple[str, str]) -> None:
        fn, args, reply = self._links[link].popleft()
        try:
            result = fn(*args)
        except Exception as e:  # kept, and raised by the simulation
            if self.error is None:
                self.error = e
            self.loop.stop()
            return
        reply.ready(result, self.loop.time() + self.latency_s)


class _Method:
    def __init__(self, net: Network, link: tuple[str, str], fn: Callable[..., Any]) -> None:
        self._net, self._link, self._fn = net, link, fn

    def remote(self, *args: Any) -> Reply:
        return self._net.send(self._link, self._fn, args)


class Handle:
    """A simulated actor handle: ``handle.method.remote(*args)`` calls ``target.method``."""

    def __init__(self, net: Network, link: tuple[str, str], target: object) -> None:
        self._net, self._link, self._target = net, link, target

    def __getattr__(self, method: str) -> _Method:
        return _Method(self._net, self._link, getattr(self._target, method))
