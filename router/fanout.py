"""n > 1: one Generate call fanned out into n child requests, as vLLM V1 does it.

Child i of request ``r`` is an ordinary request named ``r-i`` (``child_id``) with the same
prompt; its own state, attempts and stream of tokens, so preemption, retries and metrics
treat it as any other request (the metrics count the children as requests). What ties them
together lives here:

- sampling: a seeded request's child i draws with seed ``seed + i`` (mod 2^64, as vLLM
  does), so the n streams differ and come out the same on every call; child 0 is the
  stream the same request with n = 1 gives. Unseeded children draw independently; greedy
  children give n identical streams.
- admission: the children are admitted together or not at all (``Families.admit``); each
  counts in the queue.
- placement: a child goes to the decode worker a sibling already holds when that worker is
  among the good options (``prefer``), so with prefix caching the prompt's KV blocks are
  shared there.
- ending: abort, cancel or deadline of the parent ends every child; one child failing (an
  error status: lost workers, a deadline) ends the others with the same status, since a
  gRPC stream ends with one status. A child that finishes (stop, length) leaves its
  siblings running.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

from pdserve.engine.sequence import SamplingParams
from pdserve.router.placement import Placement
from pdserve.router.request import Request

_MASK64 = (1 << 64) - 1


def child_id(request_id: str, index: int) -> str:
    """The id of child ``index`` of ``request_id``."""
    return f"{request_id}-{index}"


def child_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """Child ``index``'s sampling: the parent's, its seed (if any) moved by ``index``."""
    if sampling.seed is None or index == 0:
        return sampling
    return dataclasses.replace(sampling, seed=(sampling.seed + index) & _MASK64)


class Families:
    """Which child requests belong to which parent, while any of them is in flight."""

    def __init__(self) -> None:
        self._children: dict[str, list[str]] = {}
        self._parent: dict[str, str] = {}

    def __contains__(self, parent: str) -> bool:
        return parent in self._children

    def add(self, parent: str, children: Sequence[str]) -> None:
        if parent in self._children:
            raise ValueError(f"{parent!r} is already in flight")
        self._children[parent] = list(children)
        for c in children:
            self._parent[c] = parent

    def admit(self, parent: str, children: Sequence[Request],
              admit: Callable[[Request], None], withdraw: Callable[[Request], None]) -> None:
        """``admit`` every child of ``parent``, or none: when one is refused (``admit``
        raises), ``withdraw`` the ones admitted before it and raise again."""
        if parent in self._children:
            raise ValueError(f"request_id {parent!r} is already in flight")
        done: list[Request] = []
        try:
            for child in children:
                admit(child)
                done.append(child)
        except Exception:
            for child in done:
                withdraw(child)
            raise
        self.add(parent, [c.request_id for c in children])

    def children(self, parent: str) -> list[str]:
        """The children of ``parent`` still in flight ([] if none)."""
        return list(self._children.get(parent, ()))

    def siblings(self, child: str) -> list[str]:
        """The other children of ``child``'s parent still in flight."""
        parent = self._parent.get(child)
        return [] if parent is None else [c for c in self._children[parent] if c != child]

    def ended(self, child: str) -> None:
        """``child`` left the router; the parent goes with its last child."""
        parent = self._parent.pop(child, None)
        if parent is None:
            return
        rest = [c for c in self._children[parent] if c != child]
        if rest:
            self._children[parent] = rest
        else:
            del self._children[parent]


def prefer(options: Sequence[Placement], workers: Iterable[str]) -> Placement | None:
    """The first of ``options`` (best first) on one of ``workers`` (where siblings run)
    that is as feasible as the best and harms no more requests; None: keep the best."""
    held = set(workers)
    if not held or not options:
        return None
    best = options[0]
    for o in options:
        if o.decode in held and o.feasible >= best.feasible and o.harm <= best.harm:
            return o
    return None
