"""Protobuf wire format by hand, for fuzzing what the Python API cannot send: invalid UTF-8
in string fields, unknown fields, wrong wire types, truncated and corrupt messages.

Field numbers are those of proto/pdserve.proto (``GenerateRequest``: request_id 1, text 2,
token_ids 3, messages 4, sampling 5, slo 6; ``ChatMessages.messages`` 1; ``ChatMessage``
role 1, content 2; ``SamplingParams.stop`` 6; ``Slo.class_name`` 3)."""

from __future__ import annotations

import random

from google.protobuf.message import DecodeError

from pdserve.proto import pdserve_pb2 as pb

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5

# Byte strings that are not UTF-8: a lone continuation byte, bytes never valid, an overlong
# "/", a UTF-16 surrogate, a code point past U+10FFFF, a sequence cut short.
BAD_UTF8 = (b"\x80", b"\xff", b"\xfe\xfe", b"\xc0\xaf", b"\xc3\x28", b"\xed\xa0\x80",
            b"\xf4\x90\x80\x80", b"\xe2\x82", b"ok\xf0\x9f\x98")


def varint(n: int) -> bytes:
    """Base-128 varint; a negative ``n`` as its 64-bit two's complement (10 bytes)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def ld(field: int, data: bytes) -> bytes:
    """A length-delimited field."""
    return tag(field, LEN) + varint(len(data)) + data


def decodes(raw: bytes) -> bool:
    """Whether the Python protobuf runtime (the server's) parses ``raw`` as a request."""
    try:
        pb.GenerateRequest.FromString(raw)
    except DecodeError:
        return False
    return True


def bad_utf8_string(rng: random.Random) -> bytes:
    """A GenerateRequest whose one string field holds bytes that are not UTF-8."""
    bad = rng.choice(BAD_UTF8)
    if rng.random() < 0.5:
        bad = b"abc" + bad + b"def"
    where = rng.randrange(6)
    if where == 0:  # request_id, with a valid text
        return ld(1, bad) + ld(2, b"hello")
    if where == 1:  # text
        return ld(2, bad)
    if where == 2:  # a chat message's role
        return ld(4, ld(1, ld(1, bad) + ld(2, b"hi")))
    if where == 3:  # a chat message's content
        return ld(4, ld(1, ld(1, b"user") + ld(2, bad)))
    if where == 4:  # a stop string
        return ld(2, b"hello") + ld(5, ld(6, bad))
    return ld(2, b"hello") + ld(6, ld(3, bad))  # slo.class_name


def unknown_fields(rng: random.Random) -> bytes:
    """Well-formed fields of numbers the schema does not have (kept as unknown fields)."""
    out = bytearray()
    for _ in range(rng.randint(1, 6)):
        field = rng.choice((7, 15, 16, 100, 2047, 536870911))
        wire = rng.choice((VARINT, I64, LEN, I32, SGROUP))
        if wire == VARINT:
            out += tag(field, wire) + varint(rng.getrandbits(64))
        elif wire == I64:
            out += tag(field, wire) + rng.randbytes(8)
        elif wire == I32:
            out += tag(field, wire) + rng.randbytes(4)
        elif wire == LEN:
            out += ld(field, rng.randbytes(rng.randint(0, 64)))
        else:  # a group holding one varint
            out += tag(field, SGROUP) + tag(1, VARINT) + varint(5) + tag(field, EGROUP)
    return bytes(out)


def wrong_wire_types(rng: random.Random) -> bytes:
    """Known top-level field numbers (all length-delimited: strings and messages) with a
    wire type of a number instead; the runtime keeps such a field as unknown, so what was
    decoded for that number before stays as it is."""
    out = bytearray()
    for _ in range(rng.randint(1, 4)):
        field = rng.randint(1, 6)
        wire = rng.choice((VARINT, I64, I32))
        if wire == VARINT:
            out += tag(field, wire) + varint(rng.getrandbits(rng.choice((1, 32, 64))))
        else:
            out += tag(field, wire) + rng.randbytes(8 if wire == I64 else 4)
    return bytes(out)


def corrupt(rng: random.Random, base: bytes) -> bytes:
    """A message the runtime cannot parse (checked): truncated, lengths past the end, wire
    types 6 and 7, an end-group with no start, random garbage, nesting past the recursion
    limit."""
    for _ in range(100):
        kind = rng.randrange(7)
        if kind == 0 and len(base) > 1:  # cut inside the last field
            raw = base[:rng.randint(1, len(base) - 1)]
        elif kind == 1:  # a length-delimited field claiming more than there is
            data = rng.randbytes(rng.randint(0, 16))
            raw = base + tag(rng.randint(1, 6), LEN) + varint(len(data) + rng.randint(1, 1 << 30)) \
                + data
        elif kind == 2:  # wire types that do not exist
            raw = base + tag(rng.randint(1, 20), rng.choice((6, 7))) + b"\x00"
        elif kind == 3:
            raw = base + tag(rng.randint(1, 20), EGROUP)
        elif kind == 4:
            raw = rng.randbytes(rng.randint(1, 256))
        elif kind == 5:  # a varint of more than 10 bytes
            raw = base + tag(5, VARINT) + b"\xff" * rng.randint(10, 20) + b"\x01"
        else:  # groups nested deeper than the runtime's recursion limit (100)
            depth = rng.randint(101, 5000)
            raw = base + tag(9, SGROUP) * depth + tag(9, EGROUP) * depth
        if not decodes(raw):
            return raw
    raise AssertionError("no corrupt message found in 100 tries")
