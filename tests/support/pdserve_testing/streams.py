"""Greedy streams on threads of their own, for tests that act on the deployment while
the streams run (grow or drain a pool, kill a worker)."""

from __future__ import annotations

import threading

from pdserve.proto.client import Client

# What the stream tests send (greedy, ignore_eos: each runs to its max_tokens).
PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "A recipe for a simple tomato soup: first, take four ripe tomatoes and",
    "The three laws of motion, as described by Isaac Newton, state that",
    "In 1969, the first humans landed on the Moon. The mission was",
]


class Streams:
    """Greedy streams on threads of their own; ``started`` once each has ``min_tokens``."""

    def __init__(self, client: Client, ids: list[list[int]], max_tokens: int,
                 min_tokens: int = 1) -> None:
        self.out: dict[int, list[int]] = {}
        self.errors: list[BaseException] = []
        self._seen = [0] * len(ids)
        self._cv = threading.Condition()
        self._min = min_tokens

        def run(i: int) -> None:
            got: list[int] = []
            try:
                for r in client.generate(token_ids=ids[i], max_tokens=max_tokens,
                                         temperature=0.0, ignore_eos=True):
                    got.extend(r.token_ids)
                    with self._cv:
                        self._seen[i] = len(got)
                        self._cv.notify_all()
                self.out[i] = got
            except BaseException as e:  # reported by join()
                self.errors.append(e)
                with self._cv:
                    self._seen[i] = max_tokens
                    self._cv.notify_all()

        self._threads = [threading.Thread(target=run, args=(i,)) for i in range(len(ids))]
        for t in self._threads:
            t.start()

    def wait_started(self, timeout_s: float = 120.0) -> None:
        with self._cv:
            assert self._cv.wait_for(lambda: min(self._seen) >= self._min, timeout_s)

    def join(self) -> dict[int, list[int]]:
        for t in self._threads:
            t.join()
        assert not self.errors, self.errors
        return self.out
