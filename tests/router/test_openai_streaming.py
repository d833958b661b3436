"""router.openai_api's disconnect plumbing on fake ASGI channels: a client that goes away
stops the work at once (a whole response's collection, a stream's events), and the
stream's close runs however it ends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pdserve.router.openai_api.calls import ClientGone, until_disconnected
from pdserve.router.openai_api.streaming import DONE, EventStream, event


class Peer:
    """An ASGI client: ``receive`` blocks until ``leave``; ``send`` records."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def leave(self) -> None:
        self.gone.set()

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent)


def test_until_disconnected_returns_the_work_or_cancels_it() -> None:
    async def run() -> None:
        peer = Peer()

        async def quick() -> int:
            return 7

        assert await until_disconnected(peer.receive, quick()) == 7
        cancelled = asyncio.Event()

        async def forever() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.set()

        asyncio.get_running_loop().call_later(0.01, peer.leave)
        with pytest.raises(ClientGone):
            await asyncio.wait_for(until_disconnected(peer.receive, forever()), 60)
        assert cancelled.is_set()  # the work ended before ClientGone was raised

        async def fails() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            await until_disconnected(Peer().receive, fails())

    asyncio.run(run())


def _stream(items: list[bytes], then_wait: bool, closed: list[str]
            ) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        try:
            for it in items:
                yield it
            if then_wait:
                await asyncio.Event().wait()
            yield DONE
        finally:
            closed.append("events")
    return gen()


def test_event_stream_sends_every_event_then_closes() -> None:
    async def run() -> None:
        peer, closed = Peer(), []
        body = [event({"n": 1}), event({"n": 2})]
        resp = EventStream(_stream(body, False, closed), lambda: closed.append("call"),
                           {"x-request-id": "r"})
        await resp({"type": "http"}, peer.receive, peer.send)
        start = peer.sent[0]
        headers = dict(start["headers"])
        assert start["status"] == 200 and b"content-length" not in headers
        assert headers[b"content-type"].startswith(b"text/event-stream")
        assert headers[b"x-request-id"] == b"r"
        assert peer.body == b"".join(body) + DONE
        assert peer.sent[-1] == {"type": "http.response.body", "body": b"",
                                 "more_body": False}
        assert closed == ["events", "call"]

    asyncio.run(run())


def test_event_stream_stops_when_the_client_leaves() -> None:
    async def run() -> None:
        peer, closed = Peer(), []
        resp = EventStream(_stream([event({"n": 1})], True, closed),
                           lambda: closed.append("call"))
        asyncio.get_running_loop().call_later(0.01, peer.leave)
        # A guard against a hang, not a timing: it returns once the client left.
        await asyncio.wait_for(resp({"type": "http"}, peer.receive, peer.send), 60)
        assert json.loads(peer.body.removeprefix(b"data: ")) == {"n": 1}  # no [DONE]
        assert closed == ["events", "call"]

    asyncio.run(run())


def test_event_stream_closes_the_call_even_when_it_never_started() -> None:
    async def run() -> None:
        peer, closed = Peer(), []

        async def broken(message: dict[str, Any]) -> None:
            raise OSError("connection reset")

        resp = EventStream(_stream([], False, closed), lambda: closed.append("call"))
        with pytest.raises(OSError):
            await resp({"type": "http"}, peer.receive, broken)
        assert closed == ["call"]  # the events never began: nothing of theirs to close

    asyncio.run(run())
