"""router.openai_api with n choices and logprobs: the logprobs in OpenAI's chat and
completion shapes, whole responses of n choices, and the streamed events of n interleaved
choices read from a call's feed queue (no router: the items are put on it as the feed
would)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from pdserve.engine.messages import TokenLogprobs
from pdserve.engine.sequence import SamplingParams
from pdserve.router.openai_api.calls import Call, Collected
from pdserve.router.openai_api.errors import ApiError
from pdserve.router.openai_api.logprobs import FLOOR, Logprobs, TokenStrings
from pdserve.router.openai_api.responses import Choice, Head, whole
from pdserve.router.openai_api.streaming import DONE, events
from pdserve.router.slo import ValidSlo
from pdserve.router.stream import StreamEnd, StreamItem, Submission

WORDS = {1: "Hello", 2: " wor", 3: "ld", 4: "é", 5: "!"}


def token(t: int) -> str:
    return WORDS[t]


def lp(logprob: float, *top: tuple[int, float]) -> TokenLogprobs:
    return TokenLogprobs(logprob, tuple(t for t, _ in top), tuple(v for _, v in top))


def test_chat_logprobs_shape() -> None:
    out = Logprobs(token, chat=True).of(0, [4, 5], [lp(-0.5, (4, -0.5), (1, -1.5)),
                                                    lp(float("-inf"))])
    assert out == {"content": [
        {"token": "é", "logprob": -0.5, "bytes": [0xC3, 0xA9], "top_logprobs": [
            {"token": "é", "logprob": -0.5, "bytes": [0xC3, 0xA9]},
            {"token": "Hello", "logprob": -1.5, "bytes": list(b"Hello")}]},
        {"token": "!", "logprob": FLOOR, "bytes": [0x21], "top_logprobs": []}]}
    json.dumps(out, allow_nan=False)  # -inf is sent as a number JSON has


def test_completion_logprobs_shape_and_offsets_per_choice() -> None:
    fmt = Logprobs(token, chat=False)
    first = fmt.of(0, [1, 2], [lp(-0.1, (1, -0.1), (2, -2.5)), lp(-3.0, (3, -1.0))])
    assert first == {"tokens": ["Hello", " wor"], "token_logprobs": [-0.1, -3.0],
                     # the alternatives, and the sampled token where it is not among them
                     "top_logprobs": [{"Hello": -0.1, " wor": -2.5},
                                      {"ld": -1.0, " wor": -3.0}],
                     "text_offset": [0, 5]}
    # Another choice starts at 0; choice 0's next piece goes on from its text so far.
    assert fmt.of(1, [3], [lp(-1.0)])["text_offset"] == [0]
    assert fmt.of(0, [3, 5], [lp(-1.0), lp(-2.0)])["text_offset"] == [9, 11]
    assert fmt.of(0, [5], [lp(-2.0)])["top_logprobs"] == [{"!": -2.0}]  # logprobs=0
    with pytest.raises(ValueError, match="2 tokens but 1 logprobs"):
        fmt.of(0, [1, 2], [lp(-1.0)])


def test_token_strings_decode_each_id_once() -> None:
    seen: list[int] = []

    def decode(t: int) -> str:
        seen.append(t)
        return WORDS[t]

    strings = TokenStrings(decode)
    assert [strings(t) for t in (1, 2, 1, 1)] == ["Hello", " wor", "Hello", "Hello"]
    assert seen == [1, 2]


def test_whole_response_of_n_choices() -> None:
    head = Head("cmpl-r", 1, "m", chat=False)
    ends = [StreamEnd("length", None, 7, 4), StreamEnd("stop", "\n", 7, 2)]
    body = whole(head, [Choice(0, "abcd", ends[0], {"tokens": []}), Choice(1, "ab", ends[1])])
    assert [(c["index"], c["text"], c["finish_reason"], c["stop_reason"])
            for c in body["choices"]] == [(0, "abcd", "length", None), (1, "ab", "stop", "\n")]
    assert [c["logprobs"] for c in body["choices"]] == [{"tokens": []}, None]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 6, "total_tokens": 13}
    chat = whole(Head("chatcmpl-r", 1, "m", chat=True), [Choice(1, "x", ends[1])])
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "x"}


class _Router:
    def __init__(self) -> None:
        self.gone: list[tuple[str, str]] = []
        self.client_gone = _Remote(lambda *a: self.gone.append(a))


class _Remote:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.remote = fn


class _Host:
    def __init__(self) -> None:
        self.router = _Router()
        self.streams: dict[str, asyncio.Queue[StreamItem]] = {}


def call_of(n: int, items: list[StreamItem]) -> Call:
    sub = Submission("r", [1, 2], SamplingParams(), (), ValidSlo(None, None), 0.0, None, n)
    call = Call(_Host(), sub)  # type: ignore[arg-type]
    for it in items:
        call.queue.put_nowait(it)
    return call


def end(reason: str, completion: int) -> StreamEnd:
    return StreamEnd(reason, None, 2, completion)


# Two choices, interleaved (as the feed delivers them: no two of one choice in a row, which
# merge would join); choice 0 ends first.
ITEMS: list[StreamItem] = [
    ("r", [1], "Hello", None, 0, [lp(-0.1)]),
    ("r", [3], "ld", None, 1, [lp(-0.2)]),
    ("r", [2], " wor", end("length", 2), 0, [lp(-0.4)]),
    ("r", [5], "!", end("stop", 2), 1, [lp(-0.3)]),
]


def test_collect_gathers_each_choice_until_the_last_ends() -> None:
    call = call_of(2, ITEMS)
    got: list[Collected] = asyncio.run(call.collect())
    assert [(c.index, c.text, c.token_ids, c.end) for c in got] == [
        (0, "Hello wor", [1, 2], end("length", 2)), (1, "ld!", [3, 5], end("stop", 2))]
    assert [[x.logprob for x in c.logprobs] for c in got] == [[-0.1, -0.4], [-0.2, -0.3]]
    assert call.ended  # the router ended it: closing reports no client gone
    call.close()
    assert call.host.router.gone == []  # type: ignore[attr-defined]


def test_a_call_whose_first_choice_ended_is_still_open() -> None:
    call = call_of(2, ITEMS[:3])

    async def three_items() -> list[StreamItem]:
        out = []
        async for it in call.items():
            out.append(it)
            if len(out) == 3:
                break
        return out

    assert asyncio.run(three_items())[-1][3] == end("length", 2)
    assert not call.ended
    call.close()  # the client left with choice 0 still running
    assert call.host.router.gone == [("r", "CANCELLED")]  # type: ignore[attr-defined]


def test_a_failed_choice_fails_the_call() -> None:
    failed = StreamEnd(error=("UNAVAILABLE", "decode worker lost"))
    call = call_of(2, [ITEMS[0], ("r", [], "", failed, 1, None)])
    with pytest.raises(ApiError) as e:
        asyncio.run(call.collect())
    assert e.value.code == "UNAVAILABLE" and call.ended


def chunks(call: Call, chat: bool, usage: bool, fmt: Logprobs | None) -> list[Any]:
    async def run() -> list[bytes]:
        head = Head("x", 1, "m", chat)
        return [e async for e in events(call, head, usage, fmt)]

    out = asyncio.run(run())
    assert out[-1] == DONE
    return [json.loads(e.removeprefix(b"data: ")) for e in out[:-1]]


def test_streamed_chat_of_two_choices() -> None:
    got = chunks(call_of(2, ITEMS), chat=True, usage=True, fmt=Logprobs(token, chat=True))
    # The role once per choice, first; then the items as they came, each naming its choice.
    assert [c["choices"][0]["index"] for c in got[:-1]] == [0, 1, 0, 1, 0, 1]
    assert [c["choices"][0]["delta"] for c in got[:2]] == \
        [{"role": "assistant", "content": ""}] * 2
    text: dict[int, str] = {0: "", 1: ""}
    finish: dict[int, list[str | None]] = {0: [], 1: []}
    for c in got[2:-1]:
        ch = c["choices"][0]
        text[ch["index"]] += ch["delta"]["content"]
        finish[ch["index"]].append(ch["finish_reason"])
        assert [x["token"] for x in ch["logprobs"]["content"]] == [token(t) for t in
                                                                   _ids(ch["delta"])]
        assert c["usage"] is None
    assert text == {0: "Hello wor", 1: "ld!"}
    assert finish == {0: [None, "length"], 1: [None, "stop"]}
    assert got[-1]["choices"] == [] and got[-1]["usage"] == {
        "prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


def _ids(delta: dict[str, str]) -> list[int]:
    by_text = {v: k for k, v in WORDS.items()}
    return [by_text[delta["content"]]]


def test_streamed_completion_offsets_go_on_per_choice() -> None:
    got = chunks(call_of(2, ITEMS), chat=False, usage=False, fmt=Logprobs(token, chat=False))
    assert all("usage" not in c for c in got)
    offsets = [(c["choices"][0]["index"], c["choices"][0]["logprobs"]["text_offset"])
               for c in got]
    assert offsets == [(0, [0]), (1, [0]), (0, [5]), (1, [2])]


def test_streamed_without_logprobs_has_none() -> None:
    got = chunks(call_of(2, ITEMS), chat=False, usage=False, fmt=None)
    assert [c["choices"][0]["logprobs"] for c in got] == [None] * 4
    assert [c["choices"][0]["text"] for c in got] == ["Hello", "ld", " wor", "!"]


def test_a_stream_that_fails_ends_with_an_error_event() -> None:
    failed = StreamEnd(error=("UNAVAILABLE", "decode worker lost"))
    got = chunks(call_of(2, [ITEMS[0], ("r", [], "", failed, 1, None)]), chat=False,
                 usage=True, fmt=None)
    assert got[-1]["error"]["message"] == "decode worker lost"
    assert all(c.get("choices") != [] for c in got)  # no usage chunk after a failure
