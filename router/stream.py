"""What the router and its gRPC frontends say to each other about a request.

A frontend validates and tokenizes a ``Generate`` call into a ``Submission`` for the router
(a Ray call); the router answers with ``StreamItem``s for the frontend's streams, one
msgpack frame per frontend per batch of worker reports, over a loopback TCP connection of
its own to each frontend (the feed), which opens with the router's tag under the deployment's
secret (``feed_hello``). Not Ray calls: one costs the receiving process about
1 ms of CPU here against 0.1 ms for a frame (docs/benchmarks.md), and a frame goes to every
frontend at every decode step. Items are plain lists: tens of thousands of them a second
cross the process boundary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, fields

import msgpack

from pdserve.engine.messages import TokenLogprobs
from pdserve.engine.secret import TAG_BYTES, Secret
from pdserve.engine.sequence import SamplingParams
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.slo import ValidSlo


@dataclass(frozen=True)
class Submission:
    """Frontend -> router: a validated, tokenized request."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stop: tuple[str, ...]
    slo: ValidSlo
    waited_s: float  # on the frontend between the call's arrival and this message
    deadline_s: float | None  # the client's time remaining when sent; None: no deadline
    n: int = 1  # choices: the router fans the request out into n children (router.fanout)


@dataclass(frozen=True)
class StreamEnd:
    """How a stream ends: a finish reason with usage and timing, or a gRPC error."""

    finish_reason: str = ""
    matched_stop: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0
    prefill_s: float = 0.0
    kv_transfer_s: float = 0.0
    ttft_s: float = 0.0
    mean_tpot_s: float = 0.0
    e2e_s: float = 0.0
    error: tuple[str, str] | None = None  # (grpc status name, message)


# (request id, new token ids, new text, end or None, choice index, the new tokens' logprobs
# or None). With n > 1 the request id is the call's, and each choice ends on its own.
StreamItem = tuple[str, list[int], str, StreamEnd | None, int, list[TokenLogprobs] | None]

_END_FIELDS = tuple(f.name for f in fields(StreamEnd))
_FRAME_HEADER = 4  # bytes: the body's length, little-endian
FEED_HELLO_TIMEOUT_S = 5.0  # a feed connection's first bytes, its tag, come by then


def feed_hello(secret: Secret, frontend: int) -> bytes:
    """What the router sends first on frontend ``frontend``'s feed: the tag of that
    frontend under the deployment's secret (a local process without it cannot feed
    tokens into the frontend's streams)."""
    return secret.tag("router-feed", str(frontend))


async def read_hello(reader: asyncio.StreamReader, secret: Secret, frontend: int) -> bool:
    """Whether a new feed connection opens with the router's tag."""
    try:
        said = await asyncio.wait_for(reader.readexactly(TAG_BYTES), FEED_HELLO_TIMEOUT_S)
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        return False
    return secret.verify(said, "router-feed", str(frontend))


def encode(items: Sequence[StreamItem]) -> bytes:
    """One feed frame: header + msgpack body."""
    body = msgpack.packb([
        (rid, ids, text, None if end is None else [getattr(end, f) for f in _END_FIELDS],
         index, lps)
        for rid, ids, text, end, index, lps in items
    ], use_bin_type=True)
    return len(body).to_bytes(_FRAME_HEADER, "little") + body


async def read_frame(reader: asyncio.StreamReader) -> list[StreamItem] | None:
    """The next frame's items, or None once the router closed the feed."""
    try:
        head = await reader.readexactly(_FRAME_HEADER)
        body = await reader.readexactly(int.from_bytes(head, "little"))
    except asyncio.IncompleteReadError:
        return None
    items: list[StreamItem] = []
    # raw=False: strings come back as str on every msgpack version (before 1.0, bytes).
    for rid, ids, text, end, index, lps in msgpack.unpackb(body, raw=False):
        if end is not None:
            end = StreamEnd(*end)
            if end.error is not None:
                end = StreamEnd(error=(end.error[0], end.error[1]))
        if lps is not None:
            lps = [TokenLogprobs(lp, tuple(top), tuple(vals)) for lp, top, vals in lps]
        items.append((rid, ids, text, end, index, lps))
    return items


def merge(items: Sequence[StreamItem]) -> list[StreamItem]:
    """Items of one stream that are already waiting, fewer: the consecutive ones of the
    same choice, up to and with its end, as one (a slow reader gets fewer, larger messages
    instead of falling behind). Nothing of a choice follows its end."""
    out: list[StreamItem] = []
    run: list[StreamItem] = []
    for it in items:
        if run and (run[-1][4] != it[4] or run[-1][3] is not None):
            out.append(_joined(run))
            run = []
        run.append(it)
    if run:
        out.append(_joined(run))
    return out


def _joined(run: Sequence[StreamItem]) -> StreamItem:
    if len(run) == 1:
        return run[0]
    lps = None if run[0][5] is None else [lp for it in run for lp in it[5] or ()]
    return (run[0][0], [t for it in run for t in it[1]], "".join(it[2] for it in run),
            run[-1][3], run[0][4], lps)


def response(item: StreamItem) -> pb.GenerateResponse:
    """The ``GenerateResponse`` for an item without an error."""
    rid, ids, text, end, index, lps = item
    resp = pb.GenerateResponse(request_id=rid, token_ids=ids, text=text, index=index)
    if lps:
        for lp in lps:
            entry = resp.logprobs.add(logprob=lp.logprob)
            for tid, v in zip(lp.top_ids, lp.top_logprobs, strict=True):
                entry.top.add(token_id=tid, logprob=v)
    if end is None:
        return resp
    resp.finished = True
    resp.finish_reason = end.finish_reason
    if isinstance(end.matched_stop, str):
        resp.matched_stop_str = end.matched_stop
    elif isinstance(end.matched_stop, int):
        resp.matched_stop_token_id = end.matched_stop
    resp.usage.prompt_tokens = end.prompt_tokens
    resp.usage.completion_tokens = end.completion_tokens
    t = resp.timing
    t.queue_s, t.prefill_s, t.kv_transfer_s = end.queue_s, end.prefill_s, end.kv_transfer_s
    t.ttft_s, t.mean_tpot_s, t.e2e_s = end.ttft_s, end.mean_tpot_s, end.e2e_s
    return resp
