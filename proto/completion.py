"""The client's request side and result side without a channel: ``build_request`` turns
keyword arguments into a ``GenerateRequest``; ``collect`` / ``collect_choices`` gather a
Generate stream into ``Completion``s (one per choice when the request asked for n > 1).
``proto.client`` re-exports all of them."""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

from pdserve.proto import pdserve_pb2 as pb

# A chat turn: {"role": ..., "content": ...}, (role, content) or the message itself.
ChatMessageLike = Mapping[str, str] | tuple[str, str] | pb.ChatMessage


class GenerateArgs(TypedDict, total=False):
    """``build_request``'s keyword arguments, for the clients' ``generate`` to pass on."""

    text: str | None
    token_ids: Sequence[int] | None
    messages: Sequence[ChatMessageLike] | None
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int
    seed: int | None
    stop: Sequence[str]
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    min_tokens: int
    repetition_penalty: float | None
    presence_penalty: float
    frequency_penalty: float
    min_p: float
    logprobs: bool
    top_logprobs: int
    n: int | None
    ttft_ms: float
    tpot_ms: float
    slo_class: str
    request_id: str


def _chat_message(m: ChatMessageLike) -> pb.ChatMessage:
    if isinstance(m, pb.ChatMessage):
        return m
    if isinstance(m, tuple):
        role, content = m
        return pb.ChatMessage(role=role, content=content)
    return pb.ChatMessage(role=m["role"], content=m["content"])


def build_request(
    *,
    text: str | None = None,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[ChatMessageLike] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    min_tokens: int = 0,
    repetition_penalty: float | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    min_p: float = 0.0,
    logprobs: bool = False,
    top_logprobs: int = 0,
    n: int | None = None,
    ttft_ms: float = 0,
    tpot_ms: float = 0,
    slo_class: str = "",
    request_id: str = "",
) -> pb.GenerateRequest:
    """Build a GenerateRequest from exactly one input (text, token_ids or messages).

    None leaves a field unset so the server applies its default (max_tokens: the server's
    default; temperature 1.0; top_p 1.0; seed: none; repetition_penalty 1.0; n 1). Values are
    not checked here beyond the one-input rule and protobuf's types: the server validates them
    (INVALID_ARGUMENT), and tests rely on sending bad values through this function.
    """
    given = [name for name, v in (("text", text), ("token_ids", token_ids),
                                  ("messages", messages)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of text, token_ids, messages; got {given or 'none'}")
    sampling = pb.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        stop=list(stop), stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos,
        min_tokens=min_tokens, repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, min_p=min_p,
        logprobs=logprobs, top_logprobs=top_logprobs, n=n,
    )
    req = pb.GenerateRequest(
        request_id=request_id, sampling=sampling, slo=pb.Slo(ttft_ms=ttft_ms, tpot_ms=tpot_ms,
                                                    class_name=slo_class)
    )
    if text is not None:
        req.text = text
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    elif messages is not None:
        # SetInParent marks an empty list as set, so the server sees "empty messages".
        req.messages.SetInParent()
        req.messages.messages.extend(_chat_message(m) for m in messages)
    return req


@dataclass(frozen=True)
class Completion:
    """A whole Generate stream (or, with n > 1, one choice of it) gathered: what most callers
    want from one request. ``usage`` is the whole call's (with n > 1: the prompt once, the
    completion tokens of every choice); ``logprobs`` has one entry per token when the request
    asked for them."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    matched_stop: str | int | None
    usage: pb.Usage
    timing: pb.Timing
    num_responses: int
    index: int = 0
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)


class _Choice:
    """Accumulates one choice's responses."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.text: list[str] = []
        self.logprobs: list[pb.TokenLogprob] = []
        self.last: pb.GenerateResponse | None = None
        self.count = 0

    def add(self, r: pb.GenerateResponse) -> None:
        self.token_ids.extend(r.token_ids)
        self.text.append(r.text)
        self.logprobs.extend(r.logprobs)
        self.last = r
        self.count += 1

    def done(self, usage: pb.Usage) -> Completion:
        last = self.last
        if last is None or not last.finished:
            raise RuntimeError("the Generate stream ended without a finished response")
        kind = last.WhichOneof("matched_stop")
        matched: str | int | None = None
        if kind == "matched_stop_str":
            matched = last.matched_stop_str
        elif kind == "matched_stop_token_id":
            matched = last.matched_stop_token_id
        return Completion(
            request_id=last.request_id, token_ids=self.token_ids, text="".join(self.text),
            finish_reason=last.finish_reason, matched_stop=matched, usage=usage,
            timing=last.timing, num_responses=self.count, index=last.index,
            logprobs=self.logprobs,
        )


class _Gather:
    """Accumulates a stream's responses by choice."""

    def __init__(self) -> None:
        self.choices: dict[int, _Choice] = {}
        self.usage = pb.Usage()

    def add(self, r: pb.GenerateResponse) -> None:
        self.choices.setdefault(r.index, _Choice()).add(r)
        if r.HasField("usage"):
            self.usage = r.usage

    def done(self) -> list[Completion]:
        if not self.choices:
            raise RuntimeError("the Generate stream ended without a finished response")
        return [self.choices[i].done(self.usage) for i in sorted(self.choices)]


def _one(choices: list[Completion]) -> Completion:
    if len(choices) != 1:
        raise ValueError(f"the stream has {len(choices)} choices: use collect_choices")
    return choices[0]


def collect_choices(responses: Iterable[pb.GenerateResponse]) -> list[Completion]:
    """Read a Generate stream to its end and gather each choice, by index."""
    g = _Gather()
    for r in responses:
        g.add(r)
    return g.done()


def collect(responses: Iterable[pb.GenerateResponse]) -> Completion:
    """Read a Generate stream of one choice (n = 1) to its end and gather it."""
    return _one(collect_choices(responses))


async def acollect_choices(responses: AsyncIterable[pb.GenerateResponse]) -> list[Completion]:
    """Read an asyncio Generate stream to its end and gather each choice, by index."""
    g = _Gather()
    async for r in responses:
        g.add(r)
    return g.done()


async def acollect(responses: AsyncIterable[pb.GenerateResponse]) -> Completion:
    """Read an asyncio Generate stream of one choice to its end and gather it."""
    return _one(await acollect_choices(responses))
