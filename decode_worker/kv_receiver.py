"""The decode worker's KV channels, one receiver per prefill worker.

A channel's receive loop ends when the channel breaks (a prefill end that died, a transfer
that timed out, a garbled header) or is closed by either end. The channel is then dropped
here and its name is reported with the next step (``StepReport.broken_channels``): the
router reopens the pair under a new name while both workers serve (a name is never used
twice on a store), and a fresh channel from the same prefill worker replaces the old one.
"""

from __future__ import annotations

import threading

from pdserve.engine.kv import KVReceiver


class ReceiverChannels:
    """Receivers by prefill worker, and the names of the channels whose receive loop ended
    since the step loop last took them. Thread-safe."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._by_peer: dict[str, KVReceiver] = {}
        self._ended: list[str] = []

    def add(self, peer: str, channel: KVReceiver) -> None:
        """``channel`` is ``peer``'s from now on; the one it replaces, if any, is closed
        (its receive loop ends)."""
        with self._mu:
            old = self._by_peer.get(peer)
            self._by_peer[peer] = channel
        if old is not None and old is not channel:
            old.close(abort=True)

    def __contains__(self, peer: str) -> bool:
        return peer in self._by_peer

    def get(self, peer: str) -> KVReceiver | None:
        with self._mu:
            return self._by_peer.get(peer)

    def pop(self, peer: str) -> KVReceiver | None:
        with self._mu:
            return self._by_peer.pop(peer, None)

    def ended(self, peer: str, channel: KVReceiver) -> None:
        """``channel``'s receive loop is over: it is dropped (unless a fresh one replaced it
        already), closed if it is not yet, and its name is reported."""
        with self._mu:
            if self._by_peer.get(peer) is channel:
                del self._by_peer[peer]
            self._ended.append(channel.name)
        if not channel.closed:  # the loop crashed: nothing receives on it any more
            channel.close(abort=True)

    def take_ended(self) -> list[str]:
        """The names of the channels that ended since the last call."""
        with self._mu:
            ended, self._ended = self._ended, []
            return ended

    def all(self) -> list[KVReceiver]:
        with self._mu:
            return list(self._by_peer.values())

    def names(self) -> dict[str, tuple[str, bool]]:
        """Each channel's name and whether it is still open, by prefill worker."""
        with self._mu:
            return {peer: (ch.name, not ch.closed) for peer, ch in self._by_peer.items()}
