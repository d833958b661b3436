"""One HTTP request's stream on its frontend: the same steps as a gRPC ``Generate`` call.

``Call.open`` registers the stream on the frontend (before the router hears of it: its
first items may come back before the answer to submit does), submits it to the router and
raises ``ApiError`` when the router refuses it; ``items`` yields the router's items as the
gRPC stream does (those of one choice already waiting merged into one; with n > 1 the
choices' items interleave as they come) until every choice has ended; ``close`` ends it,
and reports a client that went away before the end to the router (``client_gone``), which
frees its work on the workers and counts the failure, as for a cancelled gRPC stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pdserve.engine.messages import TokenLogprobs
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.config import ServerConfig
from pdserve.router.openai_api.errors import ApiError
from pdserve.router.stream import StreamEnd, StreamItem, Submission, merge

T = TypeVar("T")
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]  # an ASGI receive


class Host(Protocol):
    """What the HTTP API uses of the frontend it runs in (``router.frontend.Frontend``)."""

    index: int
    cfg: ServerConfig
    router: Any  # the router actor's handle
    tokenizer: Tokenizer | None
    streams: dict[str, asyncio.Queue[StreamItem]]
    served: int
    serving: bool

    def submission(self, req: pb.GenerateRequest, arrival: float,
                   deadline_s: float | None) -> Submission: ...


@dataclass
class Collected:
    """One choice of a whole response: its text, tokens, logprobs (when asked) and end."""

    index: int
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    end: StreamEnd | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)


class Call:
    """A submitted request's stream; ``close`` it once done, whatever happened."""

    def __init__(self, host: Host, sub: Submission) -> None:
        self.host = host
        self.sub = sub
        self.queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self.ended = False  # the router ended the stream (or never took it)
        self.closed = False
        self.deadline = (None if sub.deadline_s is None
                         else time.monotonic() + sub.deadline_s)

    @property
    def request_id(self) -> str:
        return self.sub.request_id

    async def open(self) -> None:
        host, rid = self.host, self.request_id
        if rid in host.streams:
            self.ended = self.closed = True
            host.router.count_failure.remote("ALREADY_EXISTS")
            raise ApiError("ALREADY_EXISTS", f"request_id: {rid!r} is already in flight",
                           "x-request-id")
        host.streams[rid] = self.queue
        host.served += 1
        try:
            refused = await host.router.submit.remote(self.sub, host.index)
        except BaseException:  # cancelled while submitting: the client is gone
            self.close()
            raise
        if refused is not None:  # counted by the router
            self.ended = True
            self.close()
            raise ApiError(refused[0], refused[1])

    async def items(self) -> AsyncIterator[StreamItem]:
        """The stream's items up to the end of its last choice (each choice's last item has
        a ``StreamEnd``); ``ApiError`` when one ends in an error (the router then ends the
        others)."""
        open_choices = self.sub.n
        while True:
            got = [await self.queue.get()]
            while got[-1][3] is None and not self.queue.empty():
                got.append(self.queue.get_nowait())
            for item in merge(got):
                end = item[3]
                if end is not None:
                    open_choices -= 1
                    if end.error is not None:
                        self.ended = True
                        raise ApiError(end.error[0], end.error[1])
                    if not open_choices:
                        self.ended = True
                yield item
                if not open_choices:
                    return

    async def collect(self) -> list[Collected]:
        """Every choice, whole, by index."""
        out = [Collected(i) for i in range(self.sub.n)]
        async for _, ids, text, end, index, lps in self.items():
            c = out[index]
            c.texts.append(text)
            c.token_ids += ids
            c.logprobs += lps or ()
            if end is not None:
                c.end = end
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.host.streams.pop(self.request_id, None)
        if not self.ended:  # the client went away (disconnect, or its deadline)
            late = self.deadline is not None and time.monotonic() >= self.deadline
            self.host.router.client_gone.remote(
                self.request_id, "DEADLINE_EXCEEDED" if late else "CANCELLED")


async def until_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work`` unless the client disconnects first (an ASGI ``http.disconnect``
    from ``receive``): then cancel it and raise ``ClientGone``."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientGone
    return task.result()


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
