"""The router -> frontend feed: frames round-trip, waiting items merge into one response
per choice, the last response carries the end, logprobs travel aligned with the tokens."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.engine.messages import TokenLogprobs
from pdserve.router.stream import StreamEnd, StreamItem, encode, merge, read_frame, response

END = StreamEnd(finish_reason="stop", matched_stop="\n\n", prompt_tokens=5,
                completion_tokens=3, queue_s=0.5, prefill_s=0.25, kv_transfer_s=0.125,
                ttft_s=1.0, mean_tpot_s=0.0625, e2e_s=2.0)


async def _through_a_stream(frames: list[list[StreamItem]]) -> list[list[StreamItem] | None]:
    reader = asyncio.StreamReader()
    for items in frames:
        data = encode(items)
        reader.feed_data(data[:3])  # a frame may arrive in pieces
        reader.feed_data(data[3:])
    reader.feed_eof()
    return [await read_frame(reader) for _ in range(len(frames) + 1)]


def test_frames_round_trip_and_end_with_the_connection() -> None:
    frames: list[list[StreamItem]] = [
        [("a", [1, 2], "hé", None, 0, None), ("b", [7], "x", END, 2, None)],
        [("c", [], "", StreamEnd(error=("DEADLINE_EXCEEDED", "request c: deadline")), 0, None)],
        [("d", [3], "", StreamEnd(finish_reason="stop", matched_stop=2), 0,
          [TokenLogprobs(-0.5, (3, 9), (-0.5, -1.25))])],
    ]
    got = asyncio.run(_through_a_stream(frames))
    assert got[:3] == frames
    assert got[3] is None


def test_waiting_items_merge_and_the_end_fills_usage_and_timing() -> None:
    [item] = merge([("a", [1], "he", None, 0, None), ("a", [2, 3], "llo", None, 0, None),
                    ("a", [], "!", END, 0, None)])
    assert item == ("a", [1, 2, 3], "hello!", END, 0, None)
    resp = response(item)
    assert (resp.request_id, list(resp.token_ids), resp.text) == ("a", [1, 2, 3], "hello!")
    assert resp.finished and resp.finish_reason == "stop"
    assert resp.matched_stop_str == "\n\n"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (5, 3)
    assert (resp.timing.ttft_s, resp.timing.mean_tpot_s, resp.timing.e2e_s) == (1.0, 0.0625, 2.0)
    assert not response(("a", [1], "x", None, 0, None)).finished
    assert response(("a", [], "", StreamEnd("stop", 7), 0, None)).matched_stop_token_id == 7


def test_choices_merge_apart_and_nothing_joins_an_end() -> None:
    items: list[StreamItem] = [
        ("a", [1], "x", None, 0, None), ("a", [2], "y", None, 0, None),
        ("a", [5], "p", None, 1, None), ("a", [3], "z", END, 0, None),
        ("a", [4], "w", None, 0, None),  # (cannot happen: shows an end closes the run)
    ]
    assert merge(items) == [("a", [1, 2], "xy", None, 0, None), ("a", [5], "p", None, 1, None),
                            ("a", [3], "z", END, 0, None), ("a", [4], "w", None, 0, None)]


def test_logprobs_merge_aligned_with_the_tokens_into_the_response() -> None:
    one = TokenLogprobs(-0.25, (11, 12), (-0.25, -2.0))
    two = TokenLogprobs(-3.0, (12, 11), (-0.1, -2.5))
    [item] = merge([("a", [11], "x", None, 1, [one]), ("a", [13], "y", None, 1, [two])])
    resp = response(item)
    assert resp.index == 1 and list(resp.token_ids) == [11, 13]
    assert [e.logprob for e in resp.logprobs] == [-0.25, -3.0]
    assert [[(t.token_id, t.logprob) for t in e.top] for e in resp.logprobs] == [
        [(11, -0.25), (12, -2.0)], [(12, pytest.approx(-0.1)), (11, -2.5)]]
    assert not response(("a", [1], "x", None, 0, None)).logprobs
