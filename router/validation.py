"""Validation of Generate requests: pure functions from protobuf messages to checked values.

Every rejection is a RequestError carrying INVALID_ARGUMENT and a message that names the field
the way the client wrote it ("sampling.top_p must be in (0, 1], got 1.5"), so the servicer can
pass it to `context.abort(e.code, e.message)` unchanged. Defaults for unset fields follow vLLM
and OpenAI: temperature 1.0, top_p 1.0, top_k off, max_tokens the server's default. Values
that are valid but would hurt the sampler are normalized, as vLLM does: a temperature in
(0, 0.01) becomes 0.01, a top_k of -1 or of the vocabulary size or more becomes 0 (off).

Order of use in the router: `validate_request` on arrival (cheap, before tokenizing), then
`validate_prompt_tokens` once the prompt is token ids (with `effective_max_tokens`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.slo import SloClasses, ValidSlo

MAX_REQUEST_ID_LEN = 256
MIN_TEMPERATURE = 0.01  # a smaller positive temperature is raised to this (0 stays greedy)
MAX_STOP_STRINGS = 16  # stop strings in one request
MAX_STOP_LEN = 256  # characters in one stop string
MAX_STOP_TOKEN_IDS = 64  # stop token ids in one request
BUILTIN_CLASSES = SloClasses()  # one class, no objectives


@dataclass(frozen=True)
class Limits:
    """What the served model and the operator allow."""

    max_context: int  # prompt + generated tokens of one request
    vocab_size: int
    max_tokens_limit: int  # largest max_tokens a request may ask for
    default_max_tokens: int  # max_tokens of a request that leaves it unset
    max_stop_strings: int = MAX_STOP_STRINGS
    max_stop_len: int = MAX_STOP_LEN
    max_stop_token_ids: int = MAX_STOP_TOKEN_IDS

    def __post_init__(self) -> None:
        for name in ("max_context", "vocab_size", "max_tokens_limit", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be >= 1, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"Limits.default_max_tokens={self.default_max_tokens} exceeds "
                f"max_tokens_limit={self.max_tokens_limit}"
            )


class RequestError(Exception):
    """A request the server refuses: gRPC status code, the field at fault, a full message."""

    def __init__(
        self, field: str, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT
    ) -> None:
        super().__init__(message)
        self.code = code
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ValidSampling:
    """Sampling parameters with defaults applied and ranges checked."""

    max_tokens: int
    temperature: float  # 0 = greedy, else >= MIN_TEMPERATURE
    top_p: float  # in (0, 1]; 1 = off
    top_k: int  # 0 = off, else in [1, vocab_size) (-1 and k >= vocab_size become 0)
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    max_tokens_explicit: bool = True  # False: max_tokens is the server default (may be shrunk)


@dataclass(frozen=True)
class ValidRequest:
    """A request whose fields passed the checks that need no tokenizer."""

    request_id: str  # as sent; "" = the server assigns one
    input_kind: str  # "text" | "token_ids" | "messages"
    sampling: ValidSampling
    slo: ValidSlo


def _fmt(x: float) -> str:
    # Wire floats are float32: print 1.1, not 1.100000023841858. nan and inf print as such.
    return f"{x:.7g}"


def validate_request_id(request_id: str) -> None:
    """At most 256 characters and no control characters (ids end up in logs and labels)."""
    if len(request_id) > MAX_REQUEST_ID_LEN:
        raise RequestError(
            "request_id",
            f"request_id must be at most {MAX_REQUEST_ID_LEN} characters, got {len(request_id)}",
        )
    for i, ch in enumerate(request_id):
        if ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            raise RequestError(
                "request_id", f"request_id has a control character {ch!r} at position {i}"
            )


def input_kind(req: pb.GenerateRequest) -> str:
    """Which prompt form the request uses; RequestError if it is missing or empty."""
    kind = req.WhichOneof("input")
    if kind is None:
        raise RequestError("input", "the request has no input: set text, token_ids or messages")
    if kind == "text":
        if not req.text:
            raise RequestError("text", "text must not be empty")
    elif kind == "token_ids":
        if not req.token_ids.ids:
            raise RequestError("token_ids.ids", "token_ids.ids must not be empty")
    elif kind == "messages":
        msgs = req.messages.messages
        if not msgs:
            raise RequestError("messages.messages", "messages.messages must not be empty")
        for i, m in enumerate(msgs):
            if not m.role:
                field = f"messages.messages[{i}].role"
                raise RequestError(field, f"{field} must not be empty")
    return kind


def validate_sampling(s: pb.SamplingParams, limits: Limits) -> ValidSampling:
    """Apply defaults to unset fields and check every range."""
    if s.HasField("max_tokens"):
        max_tokens = s.max_tokens
        if max_tokens < 1:
            raise RequestError("sampling.max_tokens", "sampling.max_tokens must be >= 1, got 0")
        if max_tokens > limits.max_tokens_limit:
            raise RequestError(
                "sampling.max_tokens",
                f"sampling.max_tokens must be at most {limits.max_tokens_limit}, got {max_tokens}",
            )
    else:
        max_tokens = limits.default_max_tokens

    temperature = s.temperature if s.HasField("temperature") else 1.0
    if not (math.isfinite(temperature) and temperature >= 0):
        raise RequestError(
            "sampling.temperature",
            f"sampling.temperature must be a finite number >= 0, got {_fmt(temperature)}",
        )
    if 0 < temperature < MIN_TEMPERATURE:
        # Dividing logits by a tiny temperature overflows to inf and NaN; vLLM clamps too.
        temperature = MIN_TEMPERATURE

    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not (0 < top_p <= 1):  # also false for nan
        raise RequestError(
            "sampling.top_p", f"sampling.top_p must be in (0, 1], got {_fmt(top_p)}"
        )

    if s.top_k < -1:
        raise RequestError(
            "sampling.top_k", f"sampling.top_k must be >= -1 (0 or -1: off), got {s.top_k}"
        )
    # 0 = off; so is -1, and so is a k that keeps the whole vocabulary (torch.topk would fail
    # past it).
    top_k = s.top_k if 0 < s.top_k < limits.vocab_size else 0

    if len(s.stop) > limits.max_stop_strings:
        raise RequestError(
            "sampling.stop",
            f"sampling.stop has {len(s.stop)} strings, at most {limits.max_stop_strings} allowed",
        )
    for i, text in enumerate(s.stop):
        if not text:
            raise RequestError(f"sampling.stop[{i}]", f"sampling.stop[{i}] must not be empty")
        if len(text) > limits.max_stop_len:
            raise RequestError(
                f"sampling.stop[{i}]",
                f"sampling.stop[{i}] is {len(text)} characters long, "
                f"at most {limits.max_stop_len} allowed",
            )

    if len(s.stop_token_ids) > limits.max_stop_token_ids:
        raise RequestError(
            "sampling.stop_token_ids",
            f"sampling.stop_token_ids has {len(s.stop_token_ids)} ids, "
            f"at most {limits.max_stop_token_ids} allowed",
        )
    _check_vocab(s.stop_token_ids, "sampling.stop_token_ids", limits.vocab_size)

    return ValidSampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        max_tokens_explicit=s.HasField("max_tokens"),
    )


def validate_slo(slo: pb.Slo, classes: SloClasses = BUILTIN_CLASSES) -> ValidSlo:
    """Objectives must be finite and >= 0 (0: the class's); the class must be one of
    ``classes`` ('' = the default)."""
    values: list[float | None] = []
    for name, v in (("ttft_ms", slo.ttft_ms), ("tpot_ms", slo.tpot_ms)):
        if not (math.isfinite(v) and v >= 0):
            raise RequestError(
                f"slo.{name}", f"slo.{name} must be a finite number >= 0 (0: none), got {_fmt(v)}"
            )
        values.append(v if v > 0 else None)
    cls = classes.get(slo.class_name)
    if cls is None:
        raise RequestError(
            "slo.class_name", f"slo.class_name {slo.class_name[:64]!r} is not an SLO class of "
            f"this server (it has: {', '.join(classes.names)})")
    return cls.objectives(values[0], values[1])


def validate_request(req: pb.GenerateRequest, limits: Limits,
                     classes: SloClasses = BUILTIN_CLASSES) -> ValidRequest:
    """All checks that need no tokenizer, in the order a client would fix them."""
    validate_request_id(req.request_id)
    kind = input_kind(req)
    return ValidRequest(
        request_id=req.request_id,
        input_kind=kind,
        sampling=validate_sampling(req.sampling, limits),
        slo=validate_slo(req.slo, classes),
    )


def _check_vocab(ids: Sequence[int], field: str, vocab_size: int) -> None:
    if ids and max(ids) >= vocab_size:  # max() runs in C; find the index only on failure
        i = next(i for i, t in enumerate(ids) if t >= vocab_size)
        raise RequestError(
            field, f"{field}[{i}] = {ids[i]} is out of vocabulary (size {vocab_size})"
        )


def effective_max_tokens(prompt_len: int, sampling: ValidSampling, limits: Limits) -> int:
    """max_tokens to use for a prompt of `prompt_len` tokens.

    An explicit max_tokens stays as asked (validate_prompt_tokens rejects it if it does not
    fit); the server default shrinks to the room the context leaves, as vLLM does, but to no
    less than 1 (so a prompt that fills the context is still rejected).
    """
    if sampling.max_tokens_explicit:
        return sampling.max_tokens
    return max(1, min(sampling.max_tokens, limits.max_context - prompt_len))


def validate_prompt_tokens(ids: Sequence[int], max_tokens: int, limits: Limits) -> None:
    """Checks once the prompt is token ids: not empty, in vocabulary, fits the context with
    max_tokens. Ids out of vocabulary are reported as token_ids.ids[i] (only a token_ids input
    can have them; a tokenizer's ids are in range)."""
    if not ids:
        raise RequestError("input", "the prompt is empty after tokenization")
    _check_vocab(ids, "token_ids.ids", limits.vocab_size)
    if len(ids) + max_tokens > limits.max_context:
        raise RequestError(
            "sampling.max_tokens",
            f"len(prompt)={len(ids)} + sampling.max_tokens={max_tokens} exceeds the model "
            f"context of {limits.max_context}",
        )
