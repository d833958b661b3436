"""The router's view of the KV channels, one per (prefill, decode) pair: opening them, and
reopening one that broke.

A channel opens the first time its pair is used, or at launch and when a worker joins
(``open``): the decode worker hosts it (``host_channel``: a store, and a channel name of
the form ``{prefill}@{decode}:e{epoch}.{nonce}``, never used twice), then the prefill worker
joins it (``connect``). When either end reports that the channel broke or was closed (a
``TransferDone`` or a ``StepReport`` naming it), the pair leaves placement (``usable``) and
is reopened under a fresh name, with retries and backoff; a report naming a channel the pair
no longer uses (one replaced already) changes nothing. The repair gives up after
:data:`REPAIR_TRIES` tries; the next report from either worker of the pair (it is alive
and answering) starts another round. A worker that died is the liveness watch's
(``router.pools.worker_lost``): its pairs go with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pdserve.router")

Pair = tuple[str, str]  # (prefill worker, decode worker)

REPAIR_TRIES = 6
REPAIR_BACKOFF_S = 0.1  # before the second try; doubled after each failed one
REPAIR_MAX_DELAY_S = 5.0


class ChannelUnavailable(RuntimeError):
    """The pair's channel is being reopened (or could not be): no attempt may use it."""


@dataclass(frozen=True)
class Repair:
    """One broken channel reopened: ``old`` and ``new`` are the channels' names; ``seconds``
    from the report that it broke to the new one open, after ``tries`` tries."""

    pair: Pair
    old: str
    new: str
    seconds: float
    tries: int
    why: str


class Channels:
    """Every pair's channel: open, being reopened, or given up on. Runs on the router's
    event loop; ``on_open`` is called when a reopened pair is usable again (a pump)."""

    def __init__(self, prefill: dict[str, Any], decode: dict[str, Any],
                 on_open: Callable[[], None] = lambda: None) -> None:
        self.prefill = prefill  # actor handles by name, shared with the dispatcher
        self.decode = decode
        self.on_open = on_open
        self._open: dict[Pair, asyncio.Future[Any]] = {}  # opening or open
        self.names: dict[Pair, str] = {}  # the channel each open pair uses
        # (prefill, decode) -> host:port of the decode worker's store the channel opened at
        self.endpoints: dict[Pair, str] = {}
        self.repairing: dict[Pair, asyncio.Task[None]] = {}
        self.given_up: dict[Pair, str] = {}  # pair -> the name of the channel that broke
        self.repairs: list[Repair] = []  # the last few, for logs and tests
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # the backoff's

    def usable(self, p: str, d: str) -> bool:
        """Placement may send a transfer over (p, d): its channel is not being reopened."""
        return (p, d) not in self.repairing and (p, d) not in self.given_up

    async def ensure(self, p: str, d: str) -> None:
        """Open the (p, d) channel unless it is open or opening already; wait for it."""
        pair = (p, d)
        if not self.usable(p, d):
            raise ChannelUnavailable(f"the KV channel {p} -> {d} is being reopened")
        task = self._open.get(pair)
        if task is None:
            task = asyncio.ensure_future(self._connect(p, d))
            self._open[pair] = task
        try:
            await asyncio.shield(task)
        except Exception:
            if self._open.get(pair) is task:
                del self._open[pair]
            raise

    async def _connect(self, p: str, d: str) -> str:
        """A fresh channel between p and d (it replaces theirs, if any); its name."""
        host, port, name = await self.decode[d].host_channel.remote(p)
        await self.prefill[p].connect.remote(d, host, port, name)
        self.names[(p, d)] = name
        self.endpoints[(p, d)] = f"{host}:{port}"
        log.info("KV channel %s open (store %s:%d)", name, host, port)
        return name

    # -- broken channels ---------------------------------------------------------------------
    def broken(self, name: str, why: str) -> bool:
        """An end reports that channel ``name`` broke or closed: if it is still its pair's
        channel, the pair leaves placement and is reopened; True then."""
        pair = next((pair for pair, n in self.names.items() if n == name), None)
        if pair is None or pair in self.repairing:
            return False  # replaced already, being replaced, or its pair left
        del self.names[pair]
        self.endpoints.pop(pair, None)
        self._open.pop(pair, None)
        log.warning("KV channel %s broke (%s): reopening it", name, why)
        self._repair(pair, name, why)
        return True

    def revive(self, worker: str) -> None:
        """``worker`` reported: it is alive and answering; pairs of it given up on are
        tried again."""
        for pair in [pair for pair in self.given_up if worker in pair]:
            self._repair(pair, self.given_up.pop(pair), "tried again")

    def _repair(self, pair: Pair, old: str, why: str) -> None:
        task = asyncio.ensure_future(self._reopen(pair, old, why, time.monotonic()))
        self.repairing[pair] = task

    async def _reopen(self, pair: Pair, old: str, why: str, since: float) -> None:
        p, d = pair
        delay = REPAIR_BACKOFF_S
        try:
            for tries in range(1, REPAIR_TRIES + 1):
                if p not in self.prefill or d not in self.decode:
                    return  # a worker left: nothing to reopen
                try:
                    new = await self._connect(p, d)
                except Exception as e:  # a dead worker: the liveness watch removes it
                    log.warning("KV channel %s -> %s: reopening failed (try %d of %d): %s: %s",
                                p, d, tries, REPAIR_TRIES, type(e).__name__, e)
                    await self.sleep(delay)
                    delay = min(2 * delay, REPAIR_MAX_DELAY_S)
                    continue
                self._open[pair] = _done()
                self.repairs = [*self.repairs[-31:], Repair(
                    pair, old, new, time.monotonic() - since, tries, why)]
                log.info("KV channel %s -> %s reopened as %s after %.2f s", p, d, new,
                         time.monotonic() - since)
                del self.repairing[pair]
                self.on_open()
                return
            log.error("KV channel %s -> %s: not reopened after %d tries; the pair stays out "
                      "of placement until one of its workers reports", p, d, REPAIR_TRIES)
            self.given_up[pair] = old
        finally:
            if self.repairing.get(pair) is asyncio.current_task():
                del self.repairing[pair]

    # -- workers that leave ------------------------------------------------------------------
    async def close_all(self, worker: str) -> None:
        """``worker`` leaves: no repair of its pairs goes on, and both ends of each of its
        channels close at once (each close is local; a dead peer has nothing to close)."""
        pairs = {pair for pair in [*self._open, *self.repairing, *self.given_up]
                 if worker in pair}
        calls = []
        for pair in pairs:
            task = self.repairing.pop(pair, None)
            if task is not None:
                task.cancel()
            opened = self._open.pop(pair, None)
            self.given_up.pop(pair, None)
            self.names.pop(pair, None)
            self.endpoints.pop(pair, None)
            if opened is not None and (not opened.done() or opened.cancelled()
                                       or opened.exception() is not None):
                continue  # never opened
            p, d = pair
            calls += [self.prefill[p].disconnect.remote(d), self.decode[d].close_channel.remote(p)]
        for ref in calls:
            with contextlib.suppress(Exception):  # a dead peer has nothing to close
                await ref


def _done() -> asyncio.Future[None]:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    fut.set_result(None)
    return fut
