"""The OpenAI response bodies: whole responses (``chat.completion``, ``text_completion``)
and streamed chunks (``chat.completion.chunk``, ``text_completion``), as JSON-ready dicts.

A response has one choice per ``n``, by index, each with its own finish reason; its usage
counts the prompt once and the completion tokens of every choice. Beside OpenAI's fields, a
choice carries vLLM's ``stop_reason``: the stop string or stop token id that ended it (None
at EOS or at max_tokens). ``logprobs`` is None unless the request asked for them
(``logprobs.Logprobs`` gives their shapes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pdserve.router.stream import StreamEnd

Json = dict[str, Any]


@dataclass(frozen=True)
class Head:
    """What every body of one response repeats."""

    id: str  # chatcmpl-<request id> or cmpl-<request id>
    created: int  # Unix seconds
    model: str
    chat: bool

    def base(self, obj: str) -> Json:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


@dataclass(frozen=True)
class Choice:
    """A whole response's choice."""

    index: int
    text: str
    end: StreamEnd
    logprobs: Json | None = None


def usage(ends: Sequence[StreamEnd]) -> Json:
    """The usage of a response whose choices ended with ``ends`` (the prompt once)."""
    prompt = ends[0].prompt_tokens if ends else 0
    completion = sum(e.completion_tokens for e in ends)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _finish(end: StreamEnd | None) -> Json:
    if end is None:
        return {"finish_reason": None}
    return {"finish_reason": end.finish_reason, "stop_reason": end.matched_stop}


def whole(head: Head, choices: Sequence[Choice]) -> Json:
    """The response of a request that does not stream."""
    out = []
    for c in choices:
        if head.chat:
            body: Json = {"index": c.index,
                          "message": {"role": "assistant", "content": c.text}}
        else:
            body = {"index": c.index, "text": c.text}
        out.append({**body, "logprobs": c.logprobs, **_finish(c.end)})
    obj = "chat.completion" if head.chat else "text_completion"
    return {**head.base(obj), "choices": out, "usage": usage([c.end for c in choices])}


def chunk(head: Head, index: int, text: str | None, end: StreamEnd | None,
          include_usage: bool, role: bool = False, logprobs: Json | None = None) -> Json:
    """A streamed chunk of choice ``index``: new text (for chat, a delta; ``role`` in the
    choice's first one), its tokens' logprobs when asked, and, in the choice's last, the
    finish reason."""
    if head.chat:
        delta: Json = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice: Json = {"index": index, "delta": delta, "logprobs": logprobs,
                        **_finish(end)}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, **_finish(end)}
        obj = "text_completion"
    out = {**head.base(obj), "choices": [choice]}
    if include_usage:  # OpenAI: null in every chunk but the usage chunk
        out["usage"] = None
    return out


def usage_chunk(head: Head, ends: Sequence[StreamEnd]) -> Json:
    """The chunk after the last, when ``stream_options.include_usage``: no choices."""
    obj = "chat.completion.chunk" if head.chat else "text_completion"
    return {**head.base(obj), "choices": [], "usage": usage(ends)}


def models(name: str, created: int, max_model_len: int) -> Json:
    return {"object": "list", "data": [model(name, created, max_model_len)]}


def model(name: str, created: int, max_model_len: int) -> Json:
    return {"id": name, "object": "model", "created": created, "owned_by": "pdserve",
            "max_model_len": max_model_len}
