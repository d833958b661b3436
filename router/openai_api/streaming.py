"""Server-sent events of a streamed response, and the ASGI response that sends them while
it watches for the client to go away.

The events: for chat a first chunk with the assistant's role per choice (index 0 to n-1,
as vLLM sends them), then one chunk per item the router delivers with new text or, when
asked, new tokens' logprobs (each naming its choice's index; with n > 1 the choices
interleave as they come; a choice's last chunk has its finish reason), the usage chunk
(all choices) when ``stream_options.include_usage``, and ``data: [DONE]``. A stream that
fails after it began (its workers lost, its deadline passed) sends ``data: {"error":
{...}}`` in OpenAI's shape, which the ``openai`` client raises as ``APIError``, then
``[DONE]``.

``EventStream`` sends the events and, at the same time, reads the ASGI ``receive``: a
``http.disconnect`` (the client closed the connection) stops the events at once, even
while the request waits for its first token, and ``on_close`` (``Call.close``) tells the
router, which aborts the request on the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from pdserve.router.openai_api.calls import Call
from pdserve.router.openai_api.errors import ApiError
from pdserve.router.openai_api.logprobs import Logprobs
from pdserve.router.openai_api.responses import Head, Json, chunk, usage_chunk
from pdserve.router.stream import StreamEnd

DONE = b"data: [DONE]\n\n"


def event(body: Json) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def events(call: Call, head: Head, include_usage: bool,
                 logprobs: Logprobs | None = None) -> AsyncIterator[bytes]:
    """The stream's events, from the router's items for ``call``; ``logprobs`` formats
    the tokens' logprobs when the request asked for them."""
    if head.chat:
        for i in range(call.sub.n):
            yield event(chunk(head, i, "", None, include_usage, role=True))
    ends: list[StreamEnd] = []
    try:
        async for _, ids, text, end, index, lps in call.items():
            lp = None if logprobs is None or not ids else logprobs.of(index, ids, lps or ())
            if text or end is not None or lp is not None:
                yield event(chunk(head, index, text if text or not head.chat else None, end,
                                  include_usage, logprobs=lp))
            if end is not None:
                ends.append(end)
        if include_usage:
            yield event(usage_chunk(head, ends))
    except ApiError as e:
        yield event(e.body())
    yield DONE


class EventStream(Response):
    """A ``text/event-stream`` response of ``body``'s events; ``on_close`` runs once it
    ends, however it ends (sent, client gone, cancelled)."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], None],
                 headers: dict[str, str] | None = None) -> None:
        # Not Response.__init__: without a body, init_headers declares no content-length.
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", **(headers or {})})
        self.events = body
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            sending = asyncio.ensure_future(self._send_all(send))
            watching = asyncio.ensure_future(_disconnected(receive))
            try:
                await asyncio.wait({sending, watching}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sending, watching):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await task
        finally:
            with contextlib.suppress(Exception):
                await self.events.aclose()  # type: ignore[attr-defined]
            self.on_close()

    async def _send_all(self, send: Send) -> None:
        async for data in self.events:
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive: Receive) -> None:
    message: Any = await receive()
    while message["type"] != "http.disconnect":
        message = await receive()
