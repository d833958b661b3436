"""The OpenAI response bodies: whole responses (``chat.completion``, ``text_completion``)
and streamed chunks (``chat.completion.chunk``, ``text_completion``), as JSON-ready dicts.

Beside OpenAI's fields, a choice carries vLLM's ``stop_reason``: the stop string or stop
token id that ended it (None at EOS or at max_tokens).
"""

from __future__ import annotations

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


def usage(end: StreamEnd) -> Json:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
            "total_tokens": end.prompt_tokens + end.completion_tokens}


def _finish(end: StreamEnd | None) -> Json:
    if end is None:
        return {"finish_reason": None}
    return {"finish_reason": end.finish_reason, "stop_reason": end.matched_stop}


def whole(head: Head, text: str, end: StreamEnd) -> Json:
    """The response of a request that does not stream."""
    if head.chat:
        choice: Json = {"index": 0, "message": {"role": "assistant", "content": text},
                        "logprobs": None, **_finish(end)}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, **_finish(end)}
        obj = "text_completion"
    return {**head.base(obj), "choices": [choice], "usage": usage(end)}


def chunk(head: Head, text: str | None, end: StreamEnd | None, include_usage: bool,
          role: bool = False) -> Json:
    """A streamed chunk: new text (for chat, a delta; ``role`` in the first one) and, in
    the last, the finish reason."""
    if head.chat:
        delta: Json = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice: Json = {"index": 0, "delta": delta, "logprobs": None, **_finish(end)}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, **_finish(end)}
        obj = "text_completion"
    out = {**head.base(obj), "choices": [choice]}
    if include_usage:  # OpenAI: null in every chunk but the usage chunk
        out["usage"] = None
    return out


def usage_chunk(head: Head, end: StreamEnd) -> Json:
    """The chunk after the last, when ``stream_options.include_usage``: no choices."""
    obj = "chat.completion.chunk" if head.chat else "text_completion"
    return {**head.base(obj), "choices": [], "usage": usage(end)}


def models(name: str, created: int, max_model_len: int) -> Json:
    return {"object": "list", "data": [model(name, created, max_model_len)]}


def model(name: str, created: int, max_model_len: int) -> Json:
    return {"id": name, "object": "model", "created": created, "owned_by": "pdserve",
            "max_model_len": max_model_len}
