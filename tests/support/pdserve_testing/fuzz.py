"""A seeded generator of hostile Generate requests, each with the outcomes the wire API
allows for it (proto/pdserve.proto, docs/reliability.md).

Every ``Case`` is serialized bytes (so hand-built wire messages travel the same way as
protobuf-built ones), the status codes allowed with the words the message must hold (the
field at fault), and, for a request that must succeed, the most tokens it may stream. The
same seed gives the same cases. Categories (``CATEGORIES``): valid requests with random and
extreme-but-legal values (OK), one bad field or several (INVALID_ARGUMENT naming a field),
tight objectives (OK or RESOURCE_EXHAUSTED from admission), a request_id already in flight
(ALREADY_EXISTS), a message past gRPC's 4 MiB limit (RESOURCE_EXHAUSTED from gRPC itself),
and raw wire bytes: unknown fields and wrong wire types (decodable: OK), invalid UTF-8 and
corrupt messages (INVALID_ARGUMENT naming the message type: ``router.grpc_service``)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from pdserve.proto import pdserve_pb2 as pb
from pdserve_testing import fuzz_wire as wire

OK, INVALID, EXHAUSTED, EXISTS = "OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "ALREADY_EXISTS"
F32_MAX, F32_TINY = 3.4028234e38, 1.4e-45  # the largest and the smallest positive float32
INT32_MIN, INT32_MAX, UINT32_MAX, UINT64_MAX = -(1 << 31), (1 << 31) - 1, (1 << 32) - 1, \
    (1 << 64) - 1
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's default limit on a received message
ADMISSION = ("slo.ttft_ms", "queue full")  # what admission's refusals say
# Categories whose every case must succeed (each costs a few decode steps, not a refusal).
ALWAYS_OK = frozenset({"valid_random", "valid_extreme", "unknown_fields", "wrong_wire_type",
                       "oneof_twice"})

WORDS = ("the", "of", "river", "moon", "printing", "press", "soup", "tomato", "seven",
         "quantum", "Paris", "def", "return", "{", "}", "(", ")", "\n", "42", "3.14", "naïve",
         "日本語", "Ελληνικά", "مرحبا", "🙂", "👩‍👩‍👧", "e\u0301", "\u200b", "\u202e", "\x00",
         "<|im_start|>", "<|im_end|>", "<|endoftext|>", "\ufeff", "\U0010fffd", "\t")
ROLES = ("system", "user", "assistant", "tool", "developer", "🙂", "x" * 300, "a\nb",
         "<|im_end|>", " ")


@dataclass(frozen=True)
class Case:
    """One request and what may come of it."""

    category: str
    payload: bytes
    # Allowed status code names -> words one of which a refusal's message must hold.
    expect: Mapping[str, tuple[str, ...]]
    max_tokens: int = 0  # for OK: the most tokens the stream may carry
    holder: bytes | None = None  # a valid request with the same id, held in flight first


@dataclass
class Fuzzer:
    """Hostile and valid requests for a server with these limits (``ModelInfo``'s)."""

    seed: int
    vocab_size: int
    max_context: int
    max_tokens_limit: int
    slo_classes: Sequence[str] = ("default",)
    max_stop_strings: int = 16
    max_stop_len: int = 256
    max_stop_token_ids: int = 64
    max_request_id: int = 256
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @classmethod
    def for_server(cls, seed: int, info: pb.ModelInfo, server: pb.ServerInfo) -> Fuzzer:
        return cls(seed, info.vocab_size, info.max_context_length, info.max_tokens_limit,
                   tuple(c.name for c in server.slo_classes))

    def cases(self, n: int, weights: Mapping[str, float] | None = None) -> Iterator[Case]:
        """``n`` cases, one at a time (a few are megabytes), each of a category drawn by
        ``weights`` (category -> weight; default: ``CATEGORIES``' own); the first k are the
        same whatever ``n``."""
        w = weights if weights is not None else {c: v[0] for c, v in CATEGORIES.items()}
        names = [c for c in CATEGORIES if w.get(c, 0) > 0]
        cum = list(itertools.accumulate(w[c] for c in names))
        for _ in range(n):
            yield CATEGORIES[self.rng.choices(names, cum_weights=cum)[0]][1](self)

    # -- pieces -----------------------------------------------------------------------------
    def text(self, words: int) -> str:
        r = self.rng
        return " ".join(r.choice(WORDS) if r.random() < 0.3 else f"w{r.randrange(1000)}"
                        for _ in range(words))

    def rid(self) -> str:
        return f"fz-{self.rng.getrandbits(64):016x}"

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(self.vocab_size) for _ in range(n)]

    def sampling(self, max_tokens: int) -> pb.SamplingParams:
        """Random legal sampling parameters."""
        r, v = self.rng, self.vocab_size
        s = pb.SamplingParams(max_tokens=max_tokens, ignore_eos=r.random() < 0.5)
        if r.random() < 0.7:
            s.temperature = r.choice((0.0, 1.0, 1e-6, r.uniform(0.01, 2.0)))
        if r.random() < 0.5:
            s.top_p = r.choice((1.0, r.uniform(0.05, 1.0)))
        if r.random() < 0.5:
            s.top_k = r.choice((-1, 0, r.randint(1, 100), v - 1, v, INT32_MAX))
        if r.random() < 0.5:
            s.seed = r.getrandbits(64)
        if r.random() < 0.3:
            s.stop.extend(self.text(1)[:8] or "x" for _ in range(r.randint(1, 3)))
        if r.random() < 0.3:
            s.stop_token_ids.extend(self.ids(r.randint(1, 4)))
        return s

    def valid(self) -> pb.GenerateRequest:
        """A legal request of one of the three input forms, 1 to 4 tokens."""
        r = self.rng
        req = pb.GenerateRequest(sampling=self.sampling(r.randint(1, 4)))
        if r.random() < 0.5:
            req.request_id = self.rid()
        kind = r.randrange(3)
        if kind == 0:
            req.text = self.text(r.randint(1, 24))
        elif kind == 1:
            req.token_ids.ids.extend(self.ids(r.randint(1, 48)))
        else:
            for _ in range(r.randint(1, 4)):
                req.messages.messages.add(role=r.choice(ROLES), content=self.text(
                    r.randint(0, 12)))
        return req

    def ok(self, category: str, req: pb.GenerateRequest, extra: bytes = b"") -> Case:
        return Case(category, req.SerializeToString() + extra, {OK: ()},
                    max_tokens=req.sampling.max_tokens)

    def refused(self, category: str, req: pb.GenerateRequest | bytes, *fields: str,
                code: str = INVALID) -> Case:
        raw = req if isinstance(req, bytes) else req.SerializeToString()
        return Case(category, raw, {code: fields})


# -- valid ----------------------------------------------------------------------------------
def valid_random(f: Fuzzer) -> Case:
    return f.ok("valid_random", f.valid())


def valid_extreme(f: Fuzzer) -> Case:
    """A legal request with one value at the edge of what is allowed."""
    r, req = f.rng, f.valid()
    s, v = req.sampling, f.vocab_size
    pick = r.randrange(10)
    if pick == 0:
        s.temperature = r.choice((F32_MAX, F32_TINY, -0.0, 1e-30, 100.0))
    elif pick == 1:
        s.top_p = r.choice((F32_TINY, 1e-30, 1.0))
    elif pick == 2:
        s.top_k = r.choice((INT32_MAX, -1, v, v - 1, 1))
    elif pick == 3:
        s.seed = r.choice((0, UINT64_MAX, 1 << 63))
    elif pick == 4:
        s.ClearField("stop")
        s.stop.extend(f.text(f.max_stop_len)[:f.max_stop_len]
                      for _ in range(f.max_stop_strings))
    elif pick == 5:
        s.ClearField("stop_token_ids")
        s.stop_token_ids.extend([0, v - 1, *f.ids(f.max_stop_token_ids - 2)])
    elif pick == 6:  # exactly the longest id, of characters outside ASCII
        req.request_id = "".join(r.choice("éß日🙂Ω") for _ in range(f.max_request_id - 17)) \
            + f.rid()[3:] + "-"
    elif pick == 7:
        req.slo.ttft_ms, req.slo.tpot_ms = r.choice(((F32_MAX, F32_MAX), (F32_MAX, 0.0),
                                                    (0.0, F32_MAX), (1e9, 1e9)))
    elif pick == 8:
        req.slo.class_name = r.choice(tuple(f.slo_classes))
    else:  # a text of special-token spellings only
        req.text = "".join(f.rng.choice(("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
                           for _ in range(r.randint(1, 8)))
    return f.ok("valid_extreme", req)


def unknown_fields(f: Fuzzer) -> Case:
    return f.ok("unknown_fields", f.valid(), wire.unknown_fields(f.rng))


def wrong_wire_type(f: Fuzzer) -> Case:
    return f.ok("wrong_wire_type", f.valid(), wire.wrong_wire_types(f.rng))


def oneof_twice(f: Fuzzer) -> Case:
    """Two inputs on the wire, text then token ids: the last one parsed is the one set."""
    req = f.valid()
    req.ClearField("input")
    req.token_ids.ids.extend(f.ids(f.rng.randint(1, 16)))
    return Case("oneof_twice", wire.ld(2, f.text(3).encode()) + req.SerializeToString(),
                {OK: ()}, req.sampling.max_tokens)


# -- one bad field --------------------------------------------------------------------------
def _bad_float(f: Fuzzer) -> float:
    """Not a number >= 0: NaN, an infinity, or negative (from -max to -tiny)."""
    return f.rng.choice((float("nan"), float("inf"), float("-inf"), -1.0, -F32_MAX,
                         -F32_TINY, -1e-3))


BadEdit = Callable[[Fuzzer, pb.GenerateRequest], str]  # spoils a request; the field it names


def _no_input(f: Fuzzer, req: pb.GenerateRequest) -> str:
    req.ClearField("input")
    return "input"


def _empty_input(f: Fuzzer, req: pb.GenerateRequest) -> str:
    kind = f.rng.randrange(3)
    if kind == 0:
        req.text = ""
        return "text"
    if kind == 1:
        req.token_ids.SetInParent()
        req.token_ids.ClearField("ids")
        return "token_ids.ids"
    req.messages.SetInParent()
    req.messages.ClearField("messages")
    return "messages.messages"


def _empty_role(f: Fuzzer, req: pb.GenerateRequest) -> str:
    req.messages.ClearField("messages")
    n = f.rng.randint(1, 5)
    bad = f.rng.randrange(n)
    for i in range(n):
        req.messages.messages.add(role="" if i == bad else "user", content=f.text(3))
    return f"messages.messages[{bad}].role"


def _oov_token(f: Fuzzer, req: pb.GenerateRequest) -> str:
    ids = f.ids(f.rng.randint(1, 64))
    ids[f.rng.randrange(len(ids))] = f.rng.choice((f.vocab_size, f.vocab_size + 1, UINT32_MAX,
                                                    f.rng.randint(f.vocab_size, UINT32_MAX)))
    req.token_ids.ids[:] = ids
    return "token_ids.ids["


def _oov_stop_token(f: Fuzzer, req: pb.GenerateRequest) -> str:
    req.sampling.stop_token_ids[:] = [f.rng.randint(f.vocab_size, UINT32_MAX)]
    return "sampling.stop_token_ids["


def _max_tokens(f: Fuzzer, req: pb.GenerateRequest) -> str:
    req.sampling.max_tokens = f.rng.choice((0, f.max_tokens_limit + 1, UINT32_MAX,
                                            f.rng.randint(f.max_tokens_limit + 1, UINT32_MAX)))
    return "sampling.max_tokens"


def _temperature(f: Fuzzer, req: pb.GenerateRequest) -> str:
    req.sampling.temperature = _bad_float(f)
    return "sampling.temperature"


def _top_p(f: Fuzzer, req: pb.GenerateRequest) -> str:
    req.sampling.top_p = f.rng.choice((0.0, -0.0, 1.0000001, 2.0, F32_MAX, _bad_float(f)))
    return "sampling.top_p"


def _top_k(f: Fuzzer, req: pb.GenerateRequest) -> str:
    req.sampling.top_k = f.rng.choice((-2, INT32_MIN, f.rng.randint(INT32_MIN, -2)))
    return "sampling.top_k"


def _stop(f: Fuzzer, req: pb.GenerateRequest) -> str:
    r, s = f.rng, req.sampling
    s.ClearField("stop")
    kind = r.randrange(3)
    if kind == 0:  # too many (up to a giant list)
        s.stop.extend("s" for _ in range(r.choice((f.max_stop_strings + 1, 1000, 100_000))))
        return "sampling.stop"
    n = r.randint(1, f.max_stop_strings)
    s.stop.extend("ok" for _ in range(n))
    i = r.randrange(n)
    s.stop[i] = "" if kind == 1 else "z" * r.choice((f.max_stop_len + 1, 100_000))
    return f"sampling.stop[{i}]"


def _stop_token_ids(f: Fuzzer, req: pb.GenerateRequest) -> str:
    req.sampling.stop_token_ids[:] = [1] * f.rng.choice((f.max_stop_token_ids + 1, 100_000))
    return "sampling.stop_token_ids"


def _request_id(f: Fuzzer, req: pb.GenerateRequest) -> str:
    r = f.rng
    if r.random() < 0.5:
        req.request_id = "i" * r.choice((f.max_request_id + 1, 10_000, 1_000_000))
    else:
        base = f.rid()
        i = r.randrange(len(base) + 1)
        bad = chr(r.choice((*range(0x20), *range(0x7F, 0xA0))))
        req.request_id = base[:i] + bad + base[i:]
    return "request_id"


def _slo_number(f: Fuzzer, req: pb.GenerateRequest) -> str:
    name = f.rng.choice(("ttft_ms", "tpot_ms"))
    setattr(req.slo, name, _bad_float(f))
    return f"slo.{name}"


def _slo_class(f: Fuzzer, req: pb.GenerateRequest) -> str:
    req.slo.class_name = f.rng.choice(("premium", "DEFAULT", " default", "default\x00",
                                       "x" * 10_000, "🙂", f.rid()))
    return "slo.class_name"


def _too_long(f: Fuzzer, req: pb.GenerateRequest) -> str:
    """A prompt that, with max_tokens, does not fit the context (near and far past it)."""
    r, ctx = f.rng, f.max_context
    mt = r.randint(1, 64)
    req.sampling.max_tokens = mt
    kind = r.randrange(3)
    if kind == 0:
        req.token_ids.ids[:] = [r.randrange(f.vocab_size)] * (ctx - mt + 1 + r.choice(
            (0, 1, r.randint(0, 4 * ctx))))
    elif kind == 1:  # mostly one-token words: at least 2x the context
        req.text = " the" * r.randint(2 * ctx, 4 * ctx)
    else:
        req.messages.ClearField("messages")
        req.messages.messages.add(role="user", content=" the" * r.randint(2 * ctx, 3 * ctx))
    return "sampling.max_tokens"


BAD_EDITS: dict[str, BadEdit] = {
    "no_input": _no_input, "empty_input": _empty_input, "empty_role": _empty_role,
    "oov_token": _oov_token, "oov_stop_token": _oov_stop_token, "max_tokens": _max_tokens,
    "temperature": _temperature, "top_p": _top_p, "top_k": _top_k, "stop": _stop,
    "stop_token_ids": _stop_token_ids, "request_id": _request_id, "slo_number": _slo_number,
    "slo_class": _slo_class, "too_long": _too_long,
}


def one_bad_field(f: Fuzzer) -> Case:
    name = f.rng.choice(tuple(BAD_EDITS))
    req = f.valid()
    return f.refused(f"bad_{name}", req, BAD_EDITS[name](f, req))


def several_bad_fields(f: Fuzzer) -> Case:
    """Two to four spoilt fields: the message names one of them."""
    req = f.valid()
    names = f.rng.sample(sorted(set(BAD_EDITS) - {"too_long"}), f.rng.randint(2, 4))
    fields = tuple(BAD_EDITS[n](f, req) for n in names)
    return f.refused("several_bad", req, *fields)


def huge_text(f: Fuzzer) -> Case:
    """A text prompt of 1 to 3.9 MiB (under gRPC's limit): tokenized, then refused."""
    req = f.valid()
    req.text = "the " * (f.rng.randint(1 << 20, MAX_MESSAGE_BYTES - (200 << 10)) // 4)
    req.sampling.max_tokens = 1
    return f.refused("huge_text", req, "sampling.max_tokens")


# -- other codes ----------------------------------------------------------------------------
def tight_slo(f: Fuzzer) -> Case:
    """Objectives no server meets: admission may refuse them (a TTFT objective only)."""
    r, req = f.rng, f.valid()
    req.slo.ttft_ms = r.choice((F32_TINY, 1e-3, 0.5, 1.0, 0.0))
    req.slo.tpot_ms = r.choice((F32_TINY, 1e-3, 0.0))
    if req.slo.ttft_ms == 0:
        return f.ok("tight_slo", req)
    return Case("tight_slo", req.SerializeToString(), {OK: (), EXHAUSTED: ADMISSION},
                req.sampling.max_tokens)


def duplicate_id(f: Fuzzer) -> Case:
    """A request whose id names one still streaming (held: 24 tokens, past EOS)."""
    rid = f.rid()
    holder = pb.GenerateRequest(request_id=rid, sampling=pb.SamplingParams(
        max_tokens=24, temperature=0.0, ignore_eos=True))
    holder.token_ids.ids.extend(f.ids(8))
    dup = f.valid()
    dup.request_id = rid
    return Case("duplicate_id", dup.SerializeToString(), {EXISTS: ("request_id",)},
                max_tokens=dup.sampling.max_tokens, holder=holder.SerializeToString())


def oversize(f: Fuzzer) -> Case:
    """Past gRPC's 4 MiB message limit: gRPC refuses it before pdserve sees it."""
    req = f.valid()
    over = MAX_MESSAGE_BYTES + f.rng.randint(1, 1 << 20)
    kind = f.rng.randrange(3)
    if kind == 0:
        req.text = "y" * over
    elif kind == 1:
        req.request_id = "i" * over
    else:
        req.sampling.stop.extend("s" * 1000 for _ in range(over // 1000 + 1))
    return f.refused("oversize", req, "larger than max", code=EXHAUSTED)


def bad_utf8(f: Fuzzer) -> Case:
    return f.refused("bad_utf8", wire.bad_utf8_string(f.rng), "GenerateRequest")


def corrupt(f: Fuzzer) -> Case:
    return f.refused("corrupt", wire.corrupt(f.rng, f.valid().SerializeToString()),
                     "GenerateRequest")


# name -> (weight, generator)
CATEGORIES: dict[str, tuple[float, Callable[[Fuzzer], Case]]] = {
    "valid_random": (10, valid_random), "valid_extreme": (6, valid_extreme),
    "unknown_fields": (2, unknown_fields), "wrong_wire_type": (2, wrong_wire_type),
    "oneof_twice": (1, oneof_twice), "one_bad_field": (56, one_bad_field),
    "several_bad": (8, several_bad_fields), "huge_text": (0.1, huge_text),
    "tight_slo": (4, tight_slo), "duplicate_id": (1, duplicate_id),
    "oversize": (0.4, oversize), "bad_utf8": (5, bad_utf8), "corrupt": (4.5, corrupt),
}
