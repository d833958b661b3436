"""The router's wait queue: requests admitted and not yet dispatched, in the order the
dispatcher tries them.

Under the ``slo`` scheduler the order is, within each priority (higher first): requests that
can still meet their TTFT objective, earliest TTFT deadline first (EDF); then those whose
deadline has passed (they miss it whatever happens, and serving them first would make the
ones behind them miss theirs too), oldest first; then requests without a TTFT objective,
oldest first. Admission order breaks ties. Under ``fifo`` the order is admission order, with
a re-dispatched request (preempted or failed) back in front.

The dispatcher tries every request in that order while some worker has room (no
head-of-line blocking: a request that cannot get a lease now does not hold back the ones
behind it), so ``ordered`` returns a snapshot, sorted afresh each time: lateness changes
with the clock, and a queue holds at most a few hundred requests.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from pdserve.router.request import Request

ON_TIME, LATE, NO_OBJECTIVE = 0, 1, 2  # tiers within a priority


def deadline(req: Request) -> float:
    """The request's TTFT deadline on the router's clock (inf without a TTFT objective)."""
    slo = req.ttft_slo_s
    return req.arrival + slo if slo else math.inf


def precedence(req: Request, now: float) -> tuple[int, int, float, int]:
    """The ``slo`` scheduler's sort key: smaller goes first."""
    due = deadline(req)
    if math.isinf(due):
        return (-req.slo.priority, NO_OBJECTIVE, req.arrival, req.order)
    if due < now:
        return (-req.slo.priority, LATE, req.arrival, req.order)
    return (-req.slo.priority, ON_TIME, due, req.order)


class WaitQueue:
    """Admitted requests waiting for a lease, ordered by ``policy`` ("slo" or "fifo")."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self._items: list[Request] = []

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._items)

    def __contains__(self, req: object) -> bool:
        return any(r is req for r in self._items)

    def push(self, req: Request) -> None:
        """A newly admitted request."""
        self._items.append(req)

    def push_retry(self, req: Request) -> None:
        """A request that goes back to waiting after a preemption or a failure: first in
        FIFO order; the ``slo`` order places it by its own (unchanged) deadline."""
        self._items.insert(0, req)

    def remove(self, req: Request) -> None:
        self._items = [r for r in self._items if r is not req]

    def prune(self) -> None:
        """Drop requests that ended while waiting (aborted, deadline)."""
        self._items = [r for r in self._items if not r.done]

    def ordered(self, now: float) -> list[Request]:
        """The waiting requests in the order to try them."""
        if self.policy == "fifo":
            return list(self._items)
        return sorted(self._items, key=lambda r: precedence(r, now))

    def ahead_of(self, req: Request, now: float) -> list[Request]:
        """The waiting requests the ``slo`` order serves before ``req`` (which need not be
        queued yet): what it waits behind."""
        if self.policy == "fifo":
            return [r for r in self._items if r is not req]
        key = precedence(req, now)
        return [r for r in self._items if r is not req and precedence(r, now) < key]
