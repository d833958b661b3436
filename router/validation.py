"""Validation of Generate requests: pure functions from protobuf messages to checked values.

Every rejection is a RequestError carrying INVALID_ARGUMENT and a message that names the field
the way the client wrote it ("sampling.top_p must be in (0, 1], got 1.5"), so the servicer can
pass it to `context.abort(e.code, e.message)` unchanged. Defaults for unset fields follow vLLM
and OpenAI: temperature 1.0, top_p 1.0, top_k off, max_tokens the server's default, n 1,
penalties off (repetition 1, presence and frequency 0), min_p 0, min_tokens 0, no logprobs.
The bounds that guard the server (n at most ``Limits.max_n``, min_tokens at most max_tokens,
top_logprobs at most 20) are checked here, before anything is queued. Values
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

from pdserve.engine.sequence import MAX_PENALTY, MAX_TOP_LOGPROBS
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.slo import SloClasses, ValidSlo

MAX_REQUEST_ID_LEN = 256
MIN_TEMPERATURE = 0.01  # a smaller positive temperature is raised to this (0 stays greedy)
MAX_STOP_STRINGS = 16  # stop strings in one request
MAX_STOP_LEN = 256  # characters in one stop string
MAX_STOP_TOKEN_IDS = 64  # stop token ids in one request
MAX_N = 16  # choices one request may ask for (sampling.n): each is a request of its own
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
    max_n: int = MAX_N

    def __post_init__(self) -> None:
        for name in ("max_context", "vocab_size", "max_tokens_limit", "default_max_tokens",
                     "max_n"):
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
    n: int = 1  # choices: child requests sharing the prompt (router.fanout)
    min_tokens: int = 0  # <= max_tokens
    repetition_penalty: float = 1.0  # > 0; 1 = off
    presence_penalty: float = 0.0  # in [-2, 2]
    frequency_penalty: float = 0.0  # in [-2, 2]
    min_p: float = 0.0  # in [0, 1]; 0 = off
    logprobs: bool = False
    top_logprobs: int = 0  # in [0, MAX_TOP_LOGPROBS]; needs logprobs


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
    extra = _validate_extras(s, limits, max_tokens)

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
        n=extra.n, min_tokens=extra.min_tokens, repetition_penalty=extra.repetition_penalty,
        presence_penalty=extra.presence_penalty, frequency_penalty=extra.frequency_penalty,
        min_p=extra.min_p, logprobs=extra.logprobs, top_logprobs=extra.top_logprobs,
    )


@dataclass(frozen=True)
class _Extras:
    n: int
    min_tokens: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    min_p: float
    logprobs: bool
    top_logprobs: int


def _validate_extras(s: pb.SamplingParams, limits: Limits, max_tokens: int) -> _Extras:
    """n, min_tokens, the penalties, min_p and logprobs: checked, with their defaults."""
    n = s.n if s.HasField("n") else 1
    if not 1 <= n <= limits.max_n:
        raise RequestError("sampling.n", f"sampling.n must be in [1, {limits.max_n}], got {n}")
    if s.min_tokens > max_tokens:
        default = "" if s.HasField("max_tokens") else " (the server's default)"
        raise RequestError(
            "sampling.min_tokens",
            f"sampling.min_tokens={s.min_tokens} exceeds sampling.max_tokens={max_tokens}"
            f"{default}")
    rep = s.repetition_penalty if s.HasField("repetition_penalty") else 1.0
    if not (math.isfinite(rep) and rep > 0):
        raise RequestError(
            "sampling.repetition_penalty",
            f"sampling.repetition_penalty must be a finite number > 0 (1: off), got {_fmt(rep)}")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(s, name)
        if not -MAX_PENALTY <= v <= MAX_PENALTY:  # also false for nan
            raise RequestError(f"sampling.{name}",
                               f"sampling.{name} must be in [-2, 2], got {_fmt(v)}")
    if not 0 <= s.min_p <= 1:
        raise RequestError("sampling.min_p", f"sampling.min_p must be in [0, 1], got "
                           f"{_fmt(s.min_p)}")
    if s.top_logprobs > MAX_TOP_LOGPROBS:
        raise RequestError(
            "sampling.top_logprobs",
            f"sampling.top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {s.top_logprobs}")
    if s.top_logprobs and not s.logprobs:
        raise RequestError("sampling.top_logprobs",
                           "sampling.top_logprobs needs sampling.logprobs = true")
    return _Extras(n=n, min_tokens=s.min_tokens, repetition_penalty=rep,
                   presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                   min_p=s.min_p, logprobs=s.logprobs, top_logprobs=s.top_logprobs)


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
    less than 1 nor min_tokens (so a prompt that leaves no room for them is still rejected).
    """
    if sampling.max_tokens_explicit:
        return sampling.max_tokens
    return max(1, sampling.min_tokens,
               min(sampling.max_tokens, limits.max_context - prompt_len))


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
