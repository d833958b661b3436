"""Logprobs in OpenAI's shapes, from the router's ``TokenLogprobs`` (the sampled token's
logprob under the model's raw distribution and its best alternatives, best first).

A token's string is the frontend tokenizer's decoding of that one id (special tokens
kept), its ``bytes`` that string's UTF-8 bytes, as vLLM gives them. A logprob of -inf (a
token the model cannot emit) is sent as -9999.0, as vLLM does: JSON has no infinity.

- chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
  "logprob", "bytes"}, ...]}, ...]}``;
- completions: ``{"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token:
  logprob}, ...], "text_offset": [...]}``, where a position's ``top_logprobs`` holds its
  alternatives and the sampled token, and ``text_offset`` is where each token's string
  starts in the choice's text (the sum of the lengths of the strings before it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from pdserve.engine.messages import TokenLogprobs

Json = dict[str, Any]
FLOOR = -9999.0  # what -inf is sent as


def _value(logprob: float) -> float:
    return FLOOR if logprob == -math.inf else logprob


class TokenStrings:
    """Token id -> its string, decoded once per id."""

    def __init__(self, decode: Callable[[int], str]) -> None:
        self._decode = decode
        self._known: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._known.get(token_id)
        if s is None:
            s = self._known[token_id] = self._decode(token_id)
        return s


class Logprobs:
    """The ``logprobs`` of one response's choices; a choice's pieces come in order (a
    streamed one in its chunks, a whole one at once)."""

    def __init__(self, token: Callable[[int], str], chat: bool) -> None:
        self.token = token
        self.chat = chat
        self._offset: dict[int, int] = {}  # completions: per choice, the next text_offset

    def of(self, index: int, ids: Sequence[int], lps: Sequence[TokenLogprobs]) -> Json:
        """The ``logprobs`` of choice ``index``'s next tokens ``ids``."""
        if len(ids) != len(lps):
            raise ValueError(f"{len(ids)} tokens but {len(lps)} logprobs")
        return self._chat(ids, lps) if self.chat else self._completion(index, ids, lps)

    def _entry(self, token_id: int, logprob: float) -> Json:
        s = self.token(token_id)
        return {"token": s, "logprob": _value(logprob), "bytes": list(s.encode())}

    def _chat(self, ids: Sequence[int], lps: Sequence[TokenLogprobs]) -> Json:
        content = []
        for t, lp in zip(ids, lps, strict=True):
            entry = self._entry(t, lp.logprob)
            entry["top_logprobs"] = [self._entry(a, v)
                                     for a, v in zip(lp.top_ids, lp.top_logprobs, strict=True)]
            content.append(entry)
        return {"content": content}

    def _completion(self, index: int, ids: Sequence[int], lps: Sequence[TokenLogprobs]
                    ) -> Json:
        tokens: list[str] = []
        values: list[float] = []
        tops: list[dict[str, float]] = []
        offsets: list[int] = []
        offset = self._offset.get(index, 0)
        for t, lp in zip(ids, lps, strict=True):
            s = self.token(t)
            top = {self.token(a): _value(v)
                   for a, v in zip(lp.top_ids, lp.top_logprobs, strict=True)}
            top.setdefault(s, _value(lp.logprob))
            tokens.append(s)
            values.append(_value(lp.logprob))
            tops.append(top)
            offsets.append(offset)
            offset += len(s)
        self._offset[index] = offset
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": offsets}

