"""The router -> frontend feed: frames round-trip, waiting items merge into one response,
and the last response carries the end."""

from __future__ import annotations

import asyncio

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
        [("a", [1, 2], "hé", None), ("b", [7], "x", END)],
        [("c", [], "", StreamEnd(error=("DEADLINE_EXCEEDED", "request c: deadline")))],
        [("d", [3], "", StreamEnd(finish_reason="stop", matched_stop=2))],
    ]
    got = asyncio.run(_through_a_stream(frames))
    assert got[:3] == frames
    assert got[3] is None


def test_waiting_items_merge_and_the_end_fills_usage_and_timing() -> None:
    item = merge([("a", [1], "he", None), ("a", [2, 3], "llo", None), ("a", [], "!", END)])
    assert item == ("a", [1, 2, 3], "hello!", END)
    resp = response(item)
    assert (resp.request_id, list(resp.token_ids), resp.text) == ("a", [1, 2, 3], "hello!")
    assert resp.finished and resp.finish_reason == "stop"
    assert resp.matched_stop_str == "\n\n"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (5, 3)
    assert (resp.timing.ttft_s, resp.timing.mean_tpot_s, resp.timing.e2e_s) == (1.0, 0.0625, 2.0)
    assert not response(("a", [1], "x", None)).finished
    assert response(("a", [], "", StreamEnd("stop", 7))).matched_stop_token_id == 7
