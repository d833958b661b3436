"""What the router and its gRPC frontends say to each other about a request (Ray calls).

A frontend validates and tokenizes a ``Generate`` call into a ``Submission`` for the router;
the router answers each step with ``StreamItem``s for the frontend's streams, in one
``Frontend.deliver`` call per frontend per batch of reports. Items are plain tuples: tens of
thousands of them a second cross the process boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.sequence import SamplingParams
from proto import pdserve_pb2 as pb


@dataclass(frozen=True)
class Submission:
    """Frontend -> router: a validated, tokenized request."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stop: tuple[str, ...]
    ttft_slo_s: float | None
    tpot_slo_s: float | None
    waited_s: float  # on the frontend between the call's arrival and this message
    deadline_s: float | None  # the client's time remaining when sent; None: no deadline


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


# (request id, new token ids, new text, end or None)
StreamItem = tuple[str, list[int], str, StreamEnd | None]


def merge(items: Sequence[StreamItem]) -> StreamItem:
    """Items of one stream that are already waiting, as one (a slow reader gets fewer,
    larger messages instead of falling behind). Nothing may follow an end."""
    if len(items) == 1:
        return items[0]
    return (items[0][0], [t for it in items for t in it[1]], "".join(it[2] for it in items),
            items[-1][3])


def response(item: StreamItem) -> pb.GenerateResponse:
    """The ``GenerateResponse`` for an item without an error."""
    rid, ids, text, end = item
    resp = pb.GenerateResponse(request_id=rid, token_ids=ids, text=text)
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
