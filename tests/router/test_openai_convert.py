"""router.openai_api: OpenAI bodies to GenerateRequests and back, errors in OpenAI's shape
naming the request's own fields, the response bodies."""

from __future__ import annotations

import grpc
import pytest
from pydantic import ValidationError

from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.openai_api.convert import (
    api_error,
    chat_request,
    check_model,
    completion_request,
)
from pdserve.router.openai_api.errors import (
    STATUS,
    ApiError,
    http_status,
    param_of,
    validation_error,
)
from pdserve.router.openai_api.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.router.openai_api.responses import Choice, Head, chunk, usage_chunk, whole
from pdserve.router.stream import StreamEnd
from pdserve.router.validation import Limits, RequestError, validate_request

LIMITS = Limits(max_context=2048, vocab_size=49152, max_tokens_limit=1024,
                default_max_tokens=256)


def completion(**kw: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **kw})


def chat(**kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})


def refused(make: object) -> ApiError:
    with pytest.raises(ApiError) as e:
        make()  # type: ignore[operator]
    return e.value


# ------------------------------------------------------------------ conversion
def test_completion_fields_map_onto_the_wire_request() -> None:
    req = completion_request(completion(
        max_tokens=9, temperature=0.5, top_p=0.9, top_k=5, seed=3, stop="x",
        stop_token_ids=[7], ignore_eos=True, slo_class="gold", slo_ttft_ms=200.0,
        user="ignored", unknown_field={"any": 1}), request_id="r1")
    s = req.sampling
    assert req.request_id == "r1" and req.text == "hi"
    assert (s.max_tokens, s.top_k, s.seed, list(s.stop), list(s.stop_token_ids)) == \
        (9, 5, 3, ["x"], [7])
    assert s.temperature == pytest.approx(0.5) and s.top_p == pytest.approx(0.9)
    assert s.ignore_eos and req.slo.class_name == "gold" and req.slo.ttft_ms == 200.0


def test_unset_fields_stay_unset_for_validation_defaults() -> None:
    s = completion_request(completion()).sampling
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        assert not s.HasField(name)
    v = validate_request(completion_request(completion()), LIMITS)
    assert v.sampling.max_tokens == 256 and v.sampling.temperature == 1.0


def test_prompt_forms() -> None:
    assert completion_request(completion(prompt=[1, 2, 3])).token_ids.ids == [1, 2, 3]
    assert completion_request(completion(prompt=["one"])).text == "one"
    assert completion_request(completion(prompt=[[4, 5]])).token_ids.ids == [4, 5]
    empty = completion_request(completion(prompt=[]))
    assert empty.WhichOneof("input") == "token_ids"  # validation says it is empty
    e = refused(lambda: completion_request(completion(prompt=["a", "b"])))
    assert e.param == "prompt" and "batch of 2 prompts" in e.message
    e = refused(lambda: completion_request(completion(prompt=[1, -2])))
    assert e.param == "prompt[1]"


def test_chat_messages_and_max_completion_tokens() -> None:
    req = chat_request(chat(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                    "text": "b"}]},
        {"role": "assistant", "content": None}], max_tokens=5, max_completion_tokens=8))
    assert [(m.role, m.content) for m in req.messages.messages] == \
        [("system", "be brief"), ("user", "ab"), ("assistant", "")]
    assert req.sampling.max_tokens == 8  # max_completion_tokens wins
    e = refused(lambda: chat_request(chat(messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])))
    assert e.param == "messages[0].content[0].type"


def test_sampling_fields_map_onto_the_wire() -> None:
    s = completion_request(completion(n=3, presence_penalty=0.5, frequency_penalty=-1.0,
                                      repetition_penalty=1.2, min_tokens=4, min_p=0.1,
                                      logprobs=2)).sampling
    assert (s.n, s.min_tokens, s.logprobs, s.top_logprobs) == (3, 4, True, 2)
    assert (s.presence_penalty, s.frequency_penalty) == (0.5, -1.0)
    assert s.repetition_penalty == pytest.approx(1.2) and s.min_p == pytest.approx(0.1)
    s = chat_request(chat(logprobs=True, top_logprobs=5, n=2)).sampling
    assert (s.n, s.logprobs, s.top_logprobs) == (2, True, 5)
    # Unset fields stay unset (the wire's defaults: n 1, penalties off, no logprobs).
    s = chat_request(chat()).sampling
    assert not s.HasField("n") and not s.HasField("repetition_penalty")
    assert (s.logprobs, s.top_logprobs, s.min_tokens, s.min_p) == (False, 0, 0, 0.0)


def test_completion_logprobs_zero_asks_for_the_sampled_tokens_own() -> None:
    s = completion_request(completion(logprobs=0)).sampling
    assert (s.logprobs, s.top_logprobs) == (True, 0)
    assert completion_request(completion()).sampling.logprobs is False
    s = chat_request(chat(logprobs=False, top_logprobs=0)).sampling
    assert (s.logprobs, s.top_logprobs) == (False, 0)


def test_unsupported_completion_fields_are_400_unless_neutral() -> None:
    completion_request(completion(echo=False, best_of=1, suffix=""))
    for name, value in (("echo", True), ("best_of", 2), ("suffix", "x")):
        e = refused(lambda: completion_request(completion(**{name: value})))  # noqa: B023
        assert e.code == "INVALID_ARGUMENT" and e.param == name
        assert e.message.startswith(f"{name} is not supported")


def test_negative_counts_are_400_naming_the_field() -> None:
    for name in ("n", "min_tokens", "logprobs"):
        e = refused(lambda: completion_request(completion(**{name: -1})))  # noqa: B023
        assert e.param == name and e.message.startswith(f"{name} must be in [0, ")
    assert refused(lambda: chat_request(chat(logprobs=True, top_logprobs=-1))).param == \
        "top_logprobs"


def test_wire_ranges_and_stream_options() -> None:
    assert refused(lambda: completion_request(completion(seed=-1))).param == "seed"
    assert refused(lambda: completion_request(completion(max_tokens=-3))).param == "max_tokens"
    e = refused(lambda: chat_request(chat(max_completion_tokens=2**40)))
    assert e.param == "max_completion_tokens"
    assert refused(lambda: completion_request(completion(stop_token_ids=[1, -1]))).param == \
        "stop_token_ids[1]"
    e = refused(lambda: completion_request(completion(stream_options={"include_usage": True})))
    assert e.param == "stream_options"


def test_slo_class_from_header_or_body() -> None:
    assert completion_request(completion(), header_class="gold").slo.class_name == "gold"
    assert completion_request(completion(slo_class="a"), header_class="a").slo.class_name == "a"
    e = refused(lambda: completion_request(completion(slo_class="a"), header_class="b"))
    assert e.param == "slo_class"


def test_model_must_be_the_served_one() -> None:
    check_model("m", "m")
    check_model(None, "m")
    e = refused(lambda: check_model("gpt-4o", "m"))
    assert (e.code, e.param, e.status.status, e.status.code) == \
        ("NOT_FOUND", "model", 404, "model_not_found")


# ------------------------------------------------------------------ validation errors
@pytest.mark.parametrize(("body", "chat_api", "param", "words"), [
    ({"top_p": 1.5}, False, "top_p", "top_p must be in (0, 1], got 1.5"),
    ({"temperature": -1.0}, False, "temperature", "temperature must be a finite number"),
    ({"max_tokens": 0}, False, "max_tokens", "max_tokens must be >= 1"),
    ({"max_tokens": 5000}, False, "max_tokens", "max_tokens must be at most 1024"),
    ({"max_completion_tokens": 5000}, True, "max_completion_tokens",
     "max_completion_tokens must be at most 1024"),
    ({"stop": ["ok", ""]}, False, "stop[1]", "stop[1] must not be empty"),
    ({"top_k": -2}, False, "top_k", "top_k must be >= -1"),
    ({"stop_token_ids": [10**6]}, False, "stop_token_ids[0]", "stop_token_ids[0] = 1000000"),
    ({"slo_ttft_ms": -1.0}, False, "slo_ttft_ms", "slo_ttft_ms must be"),
    ({"slo_class": "gold"}, False, "slo_class", "slo_class 'gold' is not an SLO class"),
    ({"prompt": ""}, False, "prompt", "prompt must not be empty"),
    ({"prompt": []}, False, "prompt", "prompt must not be empty"),
    ({"messages": []}, True, "messages", "messages must not be empty"),
    ({"messages": [{"role": "", "content": "x"}]}, True, "messages[0].role",
     "messages[0].role must not be empty"),
    ({"n": 0}, False, "n", "n must be in [1, 16], got 0"),
    ({"n": 17}, True, "n", "n must be in [1, 16], got 17"),
    ({"min_tokens": 9, "max_tokens": 4}, False, "min_tokens",
     "min_tokens=9 exceeds max_tokens=4"),
    ({"min_tokens": 9, "max_completion_tokens": 4}, True, "min_tokens",
     "min_tokens=9 exceeds max_completion_tokens=4"),
    ({"repetition_penalty": 0.0}, False, "repetition_penalty",
     "repetition_penalty must be a finite number > 0"),
    ({"presence_penalty": 2.5}, True, "presence_penalty", "presence_penalty must be in [-2, 2]"),
    ({"frequency_penalty": -3.0}, False, "frequency_penalty",
     "frequency_penalty must be in [-2, 2]"),
    ({"min_p": 1.5}, False, "min_p", "min_p must be in [0, 1], got 1.5"),
    ({"logprobs": True, "top_logprobs": 21}, True, "top_logprobs",
     "top_logprobs must be at most 20, got 21"),
    ({"top_logprobs": 3}, True, "top_logprobs", "top_logprobs needs logprobs = true"),
    ({"logprobs": False, "top_logprobs": 3}, True, "top_logprobs",
     "top_logprobs needs logprobs = true"),
    ({"logprobs": 21}, False, "logprobs", "logprobs must be at most 20, got 21"),
])
def test_validation_errors_name_the_openai_field(body: dict[str, object], chat_api: bool,
                                                 param: str, words: str) -> None:
    if chat_api:
        req = chat_request(chat(**body))
        mt = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    else:
        req, mt = completion_request(completion(**body)), "max_tokens"
    with pytest.raises(RequestError) as raw:
        validate_request(req, LIMITS)
    e = api_error(raw.value, chat_api, mt)
    assert (e.code, e.param) == ("INVALID_ARGUMENT", param)
    assert words in e.message and "sampling." not in e.message, e.message


def test_prompt_token_errors_name_prompt() -> None:
    e = api_error(RequestError("token_ids.ids", "token_ids.ids[3] = 99999 is out of "
                               "vocabulary (size 49152)"), chat=False)
    assert e.param == "prompt[3]" and e.message.startswith("prompt[3] = 99999")
    e = api_error(RequestError("sampling.max_tokens", "len(prompt)=10 + sampling.max_tokens=9"
                               " exceeds the model context of 12"), chat=True)
    assert e.param == "max_tokens" and "+ max_tokens=9 exceeds" in e.message
    e = api_error(RequestError("input", "the prompt is empty after tokenization"), chat=True)
    assert e.param == "messages" and e.message == "the prompt is empty after tokenization"


def test_body_type_errors_name_the_field() -> None:
    for body, param in (({"max_tokens": "many"}, "max_tokens"),
                        ({"prompt": 3}, "prompt"),
                        ({"messages": [{"role": 1}]}, "messages[0].role"),
                        ({"stream_options": {"include_usage": "x"}},
                         "stream_options.include_usage")):
        model = ChatCompletionRequest if "messages" in body or "stream_options" in body \
            else CompletionRequest
        base = {"model": "m", "messages": [], "prompt": "p"}
        with pytest.raises(ValidationError) as v:
            model.model_validate({**base, **body})
        errors = [{**e, "loc": ("body", *e["loc"])} for e in v.value.errors()]
        e = validation_error(errors)
        assert e.param == param and e.message.startswith(param), e.message
    with pytest.raises(ValidationError) as v:
        ChatCompletionRequest.model_validate({"model": "m"})
    missing = validation_error([{**e, "loc": ("body", *e["loc"])} for e in v.value.errors()])
    assert (missing.param, missing.message) == ("messages", "messages is required")
    bad_json = validation_error([{"type": "json_invalid", "loc": ("body", 7), "msg": "x",
                                  "ctx": {"error": "Expecting value"}}])
    assert bad_json.param is None and "not valid JSON" in bad_json.message


def test_param_of_drops_union_tags() -> None:
    assert param_of(("body", "prompt", "list[int]", 0)) == "prompt"
    assert param_of(("body", "stop", "str")) == "stop"
    assert param_of(("body", "messages", 2, "content", "str")) == "messages[2].content"
    assert param_of(("body",)) is None


# ------------------------------------------------------------------ error table and bodies
def test_every_status_the_api_documents_has_its_http_status() -> None:
    want = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404,
            "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503,
            "DEADLINE_EXCEEDED": 504}
    assert {k: STATUS[k].status for k in want} == want
    assert http_status("INTERNAL").status == 500 and http_status("UNKNOWN").status == 500
    for code in grpc.StatusCode:  # every gRPC status maps somewhere
        assert 400 <= http_status(code.name).status < 600 or code.name == "OK"


def test_error_body_is_openais_shape() -> None:
    e = ApiError("RESOURCE_EXHAUSTED", "predicted TTFT 900 ms > objective 200 ms")
    assert e.body() == {"error": {"message": "predicted TTFT 900 ms > objective 200 ms",
                                  "type": "rate_limit_error", "param": None,
                                  "code": "rate_limit_exceeded"}}
    assert e.headers() == {}
    assert ApiError("DEADLINE_EXCEEDED", "late").headers() == {"x-should-retry": "false"}


def test_response_bodies() -> None:
    end = StreamEnd(finish_reason="stop", matched_stop="\n", prompt_tokens=4,
                    completion_tokens=3)
    head = Head("chatcmpl-r", 1700000000, "m", chat=True)
    body = whole(head, [Choice(0, "hey", end)])
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-r"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hey"},
                                "logprobs": None, "finish_reason": "stop",
                                "stop_reason": "\n"}]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    first = chunk(head, 0, "", None, include_usage=True, role=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["usage"] is None and "usage" not in chunk(head, 0, "a", None, False)
    assert chunk(head, 0, None, end, False)["choices"][0]["delta"] == {}
    assert usage_chunk(head, [end])["choices"] == []
    text = Head("cmpl-r", 1, "m", chat=False)
    assert whole(text, [Choice(0, "x", end)])["choices"][0]["text"] == "x"
    assert chunk(text, 0, "y", None, False)["object"] == "text_completion"


def test_wire_request_is_a_generate_request() -> None:
    assert isinstance(completion_request(completion()), pb.GenerateRequest)
