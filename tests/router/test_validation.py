"""router.validation: every rejection names its field; valid requests get their defaults."""

from __future__ import annotations

import grpc
import pytest

from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.slo import ValidSlo
from pdserve.router.validation import (
    Limits,
    RequestError,
    ValidSampling,
    effective_max_tokens,
    input_kind,
    validate_prompt_tokens,
    validate_request,
    validate_request_id,
    validate_sampling,
    validate_slo,
)

NAN = float("nan")
INF = float("inf")
LIMITS = Limits(max_context=2048, vocab_size=49152, max_tokens_limit=1024,
                default_max_tokens=256)


def sampling(**kw: object) -> pb.SamplingParams:
    return pb.SamplingParams(**kw)  # type: ignore[arg-type]


def check(err: pytest.ExceptionInfo[RequestError], field: str) -> None:
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.field == field
    assert field.split("[")[0] in err.value.message or field == "input"
    assert str(err.value) == err.value.message


# ------------------------------------------------------------------ sampling


def test_sampling_defaults() -> None:
    v = validate_sampling(pb.SamplingParams(), LIMITS)
    assert v == ValidSampling(max_tokens=256, temperature=1.0, top_p=1.0, top_k=0, seed=None,
                              stop=(), stop_token_ids=(), ignore_eos=False,
                              max_tokens_explicit=False)


def test_sampling_explicit_values() -> None:
    v = validate_sampling(sampling(max_tokens=1024, temperature=0.0, top_p=0.5, top_k=-1,
                                   seed=0, stop=["a", "x" * 256], stop_token_ids=[0, 49151],
                                   ignore_eos=True), LIMITS)
    assert v.max_tokens == 1024 and v.max_tokens_explicit
    assert v.temperature == 0.0 and v.top_p == 0.5
    assert v.top_k == 0  # -1 means off, normalized to 0
    assert v.seed == 0  # an explicit 0 seed is a seed, not "none"
    assert v.stop == ("a", "x" * 256) and v.stop_token_ids == (0, 49151) and v.ignore_eos
    assert validate_sampling(sampling(top_k=50, temperature=2.5), LIMITS).top_k == 50


def test_sampling_normalization() -> None:
    def v(**kw: object) -> ValidSampling:
        return validate_sampling(sampling(**kw), LIMITS)

    assert v(top_k=49151).top_k == 49151
    assert v(top_k=49152).top_k == 0  # keeps every token: off (torch.topk fails past vocab)
    assert v(top_k=10**9).top_k == 0
    assert v(temperature=1e-30).temperature == 0.01  # no logits / 1e-30 overflow
    assert v(temperature=0.0).temperature == 0.0  # greedy stays greedy
    assert v(temperature=0.5).temperature == 0.5


@pytest.mark.parametrize(
    ("kw", "field", "message"),
    [
        ({"max_tokens": 0}, "sampling.max_tokens", r"^sampling\.max_tokens must be >= 1, got 0$"),
        ({"max_tokens": 1025}, "sampling.max_tokens",
         r"^sampling\.max_tokens must be at most 1024, got 1025$"),
        ({"temperature": -0.5}, "sampling.temperature",
         r"^sampling\.temperature must be a finite number >= 0, got -0\.5$"),
        ({"temperature": NAN}, "sampling.temperature", r"got nan$"),
        ({"temperature": INF}, "sampling.temperature", r"got inf$"),
        ({"top_p": 1.5}, "sampling.top_p", r"^sampling\.top_p must be in \(0, 1\], got 1\.5$"),
        ({"top_p": 0.0}, "sampling.top_p", r"got 0$"),
        ({"top_p": -0.1}, "sampling.top_p", r"got -0\.1$"),
        ({"top_p": NAN}, "sampling.top_p", r"got nan$"),
        ({"top_k": -2}, "sampling.top_k", r"^sampling\.top_k must be >= -1 .*got -2$"),
        ({"stop": ["ok", ""]}, "sampling.stop[1]", r"^sampling\.stop\[1\] must not be empty$"),
        ({"stop": ["y" * 257]}, "sampling.stop[0]",
         r"^sampling\.stop\[0\] is 257 characters long, at most 256 allowed$"),
        ({"stop": ["s"] * 17}, "sampling.stop",
         r"^sampling\.stop has 17 strings, at most 16 allowed$"),
        ({"stop_token_ids": [1, 49152]}, "sampling.stop_token_ids",
         r"^sampling\.stop_token_ids\[1\] = 49152 is out of vocabulary \(size 49152\)$"),
        ({"stop_token_ids": [1] * 65}, "sampling.stop_token_ids",
         r"^sampling\.stop_token_ids has 65 ids, at most 64 allowed$"),
    ],
)
def test_sampling_rejections(kw: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(RequestError, match=message) as err:
        validate_sampling(sampling(**kw), LIMITS)
    check(err, field)


def test_float32_values_print_as_sent() -> None:
    with pytest.raises(RequestError, match=r"got 1\.1$"):  # not 1.100000023841858
        validate_sampling(sampling(top_p=1.1), LIMITS)


# ------------------------------------------------------------------ slo


def test_slo() -> None:
    assert validate_slo(pb.Slo()) == ValidSlo(None, None)
    assert validate_slo(pb.Slo(ttft_ms=250, tpot_ms=0)) == ValidSlo(250.0, None)
    assert validate_slo(pb.Slo(ttft_ms=0, tpot_ms=50)) == ValidSlo(None, 50.0)


@pytest.mark.parametrize(
    ("slo", "field", "message"),
    [
        (pb.Slo(ttft_ms=-1), "slo.ttft_ms", r"^slo\.ttft_ms must be a finite number >= 0 "
                                             r"\(0: none\), got -1$"),
        (pb.Slo(tpot_ms=NAN), "slo.tpot_ms", r"got nan$"),
        (pb.Slo(tpot_ms=-INF), "slo.tpot_ms", r"got -inf$"),
        (pb.Slo(ttft_ms=INF), "slo.ttft_ms", r"got inf$"),
    ],
)
def test_slo_rejections(slo: pb.Slo, field: str, message: str) -> None:
    with pytest.raises(RequestError, match=message) as err:
        validate_slo(slo)
    check(err, field)


# ------------------------------------------------------------------ input


def test_input_kinds() -> None:
    assert input_kind(pb.GenerateRequest(text="hi")) == "text"
    assert input_kind(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]))) == "token_ids"
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="")])
    assert input_kind(pb.GenerateRequest(messages=msgs)) == "messages"


def _empty_messages() -> pb.GenerateRequest:
    req = pb.GenerateRequest()
    req.messages.SetInParent()
    return req


@pytest.mark.parametrize(
    ("req", "field", "message"),
    [
        (pb.GenerateRequest(), "input",
         r"^the request has no input: set text, token_ids or messages$"),
        (pb.GenerateRequest(text=""), "text", r"^text must not be empty$"),
        (pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids.ids",
         r"^token_ids\.ids must not be empty$"),
        (_empty_messages(), "messages.messages", r"^messages\.messages must not be empty$"),
        (pb.GenerateRequest(messages=pb.ChatMessages(messages=[
            pb.ChatMessage(role="user", content="a"), pb.ChatMessage(role="", content="b")])),
         "messages.messages[1].role", r"^messages\.messages\[1\]\.role must not be empty$"),
    ],
)
def test_input_rejections(req: pb.GenerateRequest, field: str, message: str) -> None:
    with pytest.raises(RequestError, match=message) as err:
        input_kind(req)
    check(err, field)


# ------------------------------------------------------------------ request id


@pytest.mark.parametrize("rid", ["", "abc-123", "x" * 256, "café/é"])
def test_request_id_ok(rid: str) -> None:
    validate_request_id(rid)


@pytest.mark.parametrize(
    ("rid", "message"),
    [
        ("x" * 257, r"^request_id must be at most 256 characters, got 257$"),
        ("a\nb", r"^request_id has a control character '\\n' at position 1$"),
        ("\x00", r"control character '\\x00' at position 0"),
        ("a\x7f", r"control character '\\x7f' at position 1"),
        ("a\x85", r"control character '\\x85' at position 1"),
    ],
)
def test_request_id_rejections(rid: str, message: str) -> None:
    with pytest.raises(RequestError, match=message) as err:
        validate_request_id(rid)
    check(err, "request_id")


# ------------------------------------------------------------------ whole request


def test_validate_request() -> None:
    req = pb.GenerateRequest(request_id="r1", text="hello",
                             sampling=pb.SamplingParams(max_tokens=8, temperature=0.0),
                             slo=pb.Slo(ttft_ms=100))
    v = validate_request(req, LIMITS)
    assert v.request_id == "r1" and v.input_kind == "text"
    assert v.sampling.max_tokens == 8 and v.sampling.temperature == 0.0
    assert v.slo == ValidSlo(100.0, None)


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (pb.GenerateRequest(request_id="a\tb", text="x"), "request_id"),
        (pb.GenerateRequest(), "input"),
        (pb.GenerateRequest(text="x", sampling=pb.SamplingParams(top_p=2)), "sampling.top_p"),
        (pb.GenerateRequest(text="x", slo=pb.Slo(tpot_ms=-3)), "slo.tpot_ms"),
    ],
)
def test_validate_request_rejections(req: pb.GenerateRequest, field: str) -> None:
    with pytest.raises(RequestError) as err:
        validate_request(req, LIMITS)
    check(err, field)


# ------------------------------------------------------------------ prompt tokens


def test_prompt_tokens_ok() -> None:
    validate_prompt_tokens([0, 1, 49151], 100, LIMITS)
    validate_prompt_tokens(list(range(1024)), 1024, LIMITS)  # exactly the context


@pytest.mark.parametrize(
    ("ids", "max_tokens", "field", "message"),
    [
        ([], 1, "input", r"^the prompt is empty after tokenization$"),
        ([1, 2, 3, 99999, 100000], 1, "token_ids.ids",
         r"^token_ids\.ids\[3\] = 99999 is out of vocabulary \(size 49152\)$"),
        ([5] * 2000, 49, "sampling.max_tokens",
         r"^len\(prompt\)=2000 \+ sampling\.max_tokens=49 exceeds the model context of 2048$"),
        ([5] * 2048, 1, "sampling.max_tokens", r"^len\(prompt\)=2048 \+ sampling\.max_tokens=1 "),
    ],
)
def test_prompt_tokens_rejections(ids: list[int], max_tokens: int, field: str,
                                  message: str) -> None:
    with pytest.raises(RequestError, match=message) as err:
        validate_prompt_tokens(ids, max_tokens, LIMITS)
    check(err, field)


def test_effective_max_tokens() -> None:
    default = validate_sampling(pb.SamplingParams(), LIMITS)  # 256, not explicit
    assert effective_max_tokens(10, default, LIMITS) == 256
    assert effective_max_tokens(2000, default, LIMITS) == 48  # shrinks to the room left
    assert effective_max_tokens(2048, default, LIMITS) == 1  # still rejected afterwards
    explicit = validate_sampling(sampling(max_tokens=100), LIMITS)
    assert effective_max_tokens(2000, explicit, LIMITS) == 100  # kept: the caller asked


def test_limits_checked() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        Limits(max_context=1, vocab_size=0, max_tokens_limit=1, default_max_tokens=1)
    with pytest.raises(ValueError, match="default_max_tokens=9 exceeds max_tokens_limit=8"):
        Limits(max_context=16, vocab_size=4, max_tokens_limit=8, default_max_tokens=9)


# ------------------------------------------------------------------ penalties, n, logprobs


def test_new_sampling_fields_default_off_and_pass_through() -> None:
    v = validate_sampling(pb.SamplingParams(), LIMITS)
    assert (v.n, v.min_tokens, v.repetition_penalty, v.presence_penalty,
            v.frequency_penalty, v.min_p, v.logprobs, v.top_logprobs) == (
        1, 0, 1.0, 0.0, 0.0, 0.0, False, 0)
    v = validate_sampling(sampling(n=16, max_tokens=8, min_tokens=8, repetition_penalty=1.25,
                                   presence_penalty=-2.0, frequency_penalty=2.0, min_p=1.0,
                                   logprobs=True, top_logprobs=20), LIMITS)
    assert (v.n, v.min_tokens, v.repetition_penalty, v.presence_penalty,
            v.frequency_penalty, v.min_p, v.logprobs, v.top_logprobs) == (
        16, 8, 1.25, -2.0, 2.0, 1.0, True, 20)


@pytest.mark.parametrize("kw,field,says", [
    ({"n": 0}, "sampling.n", "[1, 16]"),
    ({"n": 17}, "sampling.n", "got 17"),
    ({"n": 4_000_000_000}, "sampling.n", "[1, 16]"),  # the DoS case: unbounded n
    ({"max_tokens": 4, "min_tokens": 5}, "sampling.min_tokens", "exceeds"),
    ({"min_tokens": 300}, "sampling.min_tokens", "server's default"),  # default 256
    ({"repetition_penalty": 0.0}, "sampling.repetition_penalty", "> 0"),
    ({"repetition_penalty": -1.0}, "sampling.repetition_penalty", "> 0"),
    ({"repetition_penalty": NAN}, "sampling.repetition_penalty", "nan"),
    ({"repetition_penalty": INF}, "sampling.repetition_penalty", "inf"),
    ({"presence_penalty": 2.5}, "sampling.presence_penalty", "[-2, 2]"),
    ({"presence_penalty": NAN}, "sampling.presence_penalty", "nan"),
    ({"frequency_penalty": -2.01}, "sampling.frequency_penalty", "[-2, 2]"),
    ({"min_p": 1.5}, "sampling.min_p", "[0, 1]"),
    ({"min_p": -0.1}, "sampling.min_p", "[0, 1]"),
    ({"min_p": NAN}, "sampling.min_p", "nan"),
    ({"logprobs": True, "top_logprobs": 21}, "sampling.top_logprobs", "at most 20"),
    ({"logprobs": True, "top_logprobs": 10**6}, "sampling.top_logprobs", "at most 20"),
    ({"top_logprobs": 3}, "sampling.top_logprobs", "needs sampling.logprobs"),
])
def test_new_sampling_fields_are_bounded(kw: dict[str, object], field: str, says: str) -> None:
    with pytest.raises(RequestError) as e:
        validate_sampling(sampling(**kw), LIMITS)
    check(e, field)
    assert says in e.value.message


def test_max_n_is_the_servers() -> None:
    small = Limits(max_context=2048, vocab_size=100, max_tokens_limit=64,
                   default_max_tokens=16, max_n=2)
    assert validate_sampling(sampling(n=2), small).n == 2
    with pytest.raises(RequestError) as e:
        validate_sampling(sampling(n=3), small)
    check(e, "sampling.n")
    assert "[1, 2]" in e.value.message


def test_a_shrunk_default_max_tokens_keeps_min_tokens() -> None:
    v = validate_sampling(sampling(min_tokens=100), LIMITS)
    # 2000 prompt tokens leave 48 of the context: the default shrinks, but not below 100
    # (then validate_prompt_tokens refuses the prompt as too long).
    assert effective_max_tokens(2000, v, LIMITS) == 100
    with pytest.raises(RequestError) as e:
        validate_prompt_tokens([1] * 2000, 100, LIMITS)
    check(e, "sampling.max_tokens")
