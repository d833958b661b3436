"""The OpenAI-compatible HTTP API against a real deployment, through the official, unmodified
``openai`` client: outputs equal to the transformers reference, streaming, stop strings,
max_tokens, usage, errors in OpenAI's shape, the bearer token, and a client that goes away
aborting its request on the workers."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import openai
import pytest
import ray

from pdserve.cluster.launch import Deployment, launch
from pdserve.cluster.security_config import SecurityConfig
from pdserve.engine.weights import load_model_config
from pdserve.proto.client import Client, collect, collect_choices
from pdserve.proto.credentials import ClientAuth
from pdserve_testing.e2e import (
    HFReference,
    all_blocks_free,
    failure_counts,
    metric_values,
    openai_penalties,
    serve_config,
    wait_for,
)
from pdserve_testing.nodes import free_port

pytestmark = pytest.mark.e2e

TOKEN = "pdserve-http-token-51c9"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def served(ray_cluster: None, default_gguf: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    token_file = tmp_path_factory.mktemp("http-token") / "token"
    token_file.write_text(TOKEN + "\n")
    cfg = replace(serve_config(default_gguf, "e2e-http", mode="colocated",
                               frontends=2, http_port=free_port()),
                  security=SecurityConfig(auth_token_file=str(token_file)))
    dep = launch(cfg)
    yield dep
    dep.stop()


def _counted(dep: Deployment, code: str, want: float) -> None:
    """``request_failure_total{code}`` reaches ``want`` (the frontends report refusals to
    the router without waiting)."""
    wait_for(lambda: failure_counts(dep).get(code, 0) == want,
             what=f"{want:g} {code} failures counted, got {failure_counts(dep).get(code, 0)}")


def _base_url(dep: Deployment) -> str:
    return f"http://127.0.0.1:{dep.cfg.http_port}/v1"


@pytest.fixture(scope="module")
def client(served: Deployment) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=_base_url(served), api_key=TOKEN, max_retries=0,
                       timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _reference_text(hf: HFReference, ids: list[int], n: int) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) of the transformers reference."""
    out = hf.greedy(ids, n)
    eos = bool(out) and out[-1] == hf.eos
    text = hf.tokenizer.decode(out[:-1] if eos else out, skip_special_tokens=True)
    return text, len(out), "stop" if eos else "length"


def test_models_lists_the_served_model(client: openai.OpenAI, served: Deployment) -> None:
    listed = client.models.list().data
    assert [m.id for m in listed] == [load_model_config(served.cfg.model).name]
    assert client.models.retrieve(listed[0].id).id == listed[0].id


def test_completion_greedy_equals_transformers(
    client: openai.OpenAI, model: str, hf_reference: HFReference
) -> None:
    ids = hf_reference.tokenizer(PROMPT)["input_ids"]
    want, n, reason = _reference_text(hf_reference, ids, 16)
    by_text = client.completions.create(model=model, prompt=PROMPT, max_tokens=16,
                                        temperature=0)
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=16, temperature=0)
    for out in (by_text, by_ids):
        assert out.id.startswith("cmpl-") and out.object == "text_completion"
        choice = out.choices[0]
        assert choice.text == want and choice.finish_reason == reason
        assert out.usage is not None
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), n)
        assert out.usage.total_tokens == len(ids) + n


def test_chat_greedy_equals_transformers(
    client: openai.OpenAI, model: str, hf_reference: HFReference
) -> None:
    tok = hf_reference.tokenizer
    rendered = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    want, n, reason = _reference_text(hf_reference, ids, 24)
    out = client.chat.completions.create(model=model, messages=CHAT,  # type: ignore[arg-type]
                                         max_completion_tokens=24, temperature=0)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content == want
    assert out.choices[0].finish_reason == reason
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), n)


def test_streamed_chat_equals_whole_with_usage(client: openai.OpenAI, model: str) -> None:
    whole = client.chat.completions.create(model=model, messages=CHAT,  # type: ignore[arg-type]
                                           max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=20, temperature=0,  # type: ignore[arg-type]
        stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks
    assert len(body) >= 3  # role, some content, the finish: streamed, not one blob
    assert all(c.usage is None for c in body) and body[-1].choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == whole.choices[0].message.content
    assert body[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.choices == [] and last.usage is not None and whole.usage is not None
    assert last.usage.model_dump() == whole.usage.model_dump()


def test_streamed_completion_max_tokens(client: openai.OpenAI, model: str) -> None:
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=7,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=7, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 7


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI, model: str) -> None:
    prompt = "Q: What is 12 times 12?\nA:"
    free = client.completions.create(model=model, prompt=prompt, max_tokens=20,
                                     temperature=0).choices[0].text
    assert len(free) > 6
    stop = free[3:6]
    for stream in (False, True):
        out = client.completions.create(model=model, prompt=prompt, max_tokens=20,
                                        temperature=0, stop=[stop, "never-seen"],
                                        stream=stream)
        chunks = list(out) if stream else [out]  # type: ignore[call-overload]
        text = "".join(c.choices[0].text for c in chunks)
        assert text == free[: free.index(stop)]
        last = chunks[-1].choices[0]
        assert last.finish_reason == "stop" and last.model_extra["stop_reason"] == stop


def test_bad_requests_are_400_naming_the_field_and_counted(
    client: openai.OpenAI, model: str, served: Deployment
) -> None:
    before = failure_counts(served).get("INVALID_ARGUMENT", 0)
    cases: list[tuple[dict[str, object], str, str]] = [
        ({"temperature": -1}, "temperature", "temperature must be a finite number >= 0"),
        ({"top_p": 1.5}, "top_p", "top_p must be in (0, 1]"),
        ({"max_tokens": 100000}, "max_tokens", "max_tokens must be at most"),
        ({"extra_body": {"max_tokens": "many"}}, "max_tokens", "valid integer"),
        ({"stop": [""]}, "stop[0]", "stop[0] must not be empty"),
        ({"n": 0}, "n", "n must be in [1, 16], got 0"),
        ({"n": 17}, "n", "n must be in [1, 16], got 17"),
        ({"max_tokens": 4, "extra_body": {"min_tokens": 5}}, "min_tokens",
         "min_tokens=5 exceeds max_tokens=4"),
        ({"logprobs": 21}, "logprobs", "logprobs must be at most 20, got 21"),
        ({"extra_body": {"min_p": 1.5}}, "min_p", "min_p must be in [0, 1]"),
        ({"extra_body": {"slo_class": "gold"}}, "slo_class", "not an SLO class"),
        ({"extra_headers": {"x-pdserve-slo-class": "gold"}}, "slo_class",
         "not an SLO class"),
    ]
    for over, param, words in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, prompt=PROMPT, **over)  # type: ignore[call-overload]
        assert e.value.status_code == 400 and e.value.param == param, (over, e.value.body)
        assert words in e.value.message, (over, e.value.message)
        assert e.value.type == "invalid_request_error"
    chat_cases: list[tuple[dict[str, object], str, str]] = [
        ({"messages": [{"role": "", "content": "x"}]}, "messages[0].role", "must not be empty"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs",
         "top_logprobs must be at most 20, got 21"),
        ({"top_logprobs": 2}, "top_logprobs", "top_logprobs needs logprobs = true"),
        ({"max_completion_tokens": 3, "extra_body": {"min_tokens": 4}}, "min_tokens",
         "min_tokens=4 exceeds max_completion_tokens=3"),
    ]
    for over, param, words in chat_cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": model, "messages": CHAT, **over})  # type: ignore[call-overload]
        assert e.value.param == param and words in e.value.message, (over, e.value.body)
    _counted(served, "INVALID_ARGUMENT", before + len(cases) + len(chat_cases))
    # n=1 and other neutral values pass (clients send them).
    ok = client.completions.create(model=model, prompt=PROMPT, max_tokens=2, n=1,
                                   presence_penalty=0.0, user="someone")
    assert ok.usage is not None and ok.usage.completion_tokens >= 1


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model"


def test_admission_refusal_is_429(client: openai.OpenAI, model: str,
                                  served: Deployment) -> None:
    before = failure_counts(served).get("RESOURCE_EXHAUSTED", 0)
    with pytest.raises(openai.RateLimitError) as e:  # no TTFT can meet 1 us
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2,
                                  extra_body={"slo_ttft_ms": 0.001})
    assert "TTFT" in e.value.message
    _counted(served, "RESOURCE_EXHAUSTED", before + 1)


def test_without_the_token_401_and_health_open(served: Deployment, model: str) -> None:
    before = failure_counts(served).get("UNAUTHENTICATED", 0)
    with openai.OpenAI(base_url=_base_url(served), api_key="wrong-token",
                       max_retries=0) as c, pytest.raises(openai.AuthenticationError) as e:
        c.completions.create(model=model, prompt=PROMPT, max_tokens=2)
    assert e.value.status_code == 401 and e.value.type == "authentication_error"
    assert isinstance(e.value.body, dict) and e.value.body["message"] == "invalid bearer token"
    with pytest.raises(urllib.error.HTTPError) as raw:  # no authorization header at all
        urllib.request.urlopen(f"{_base_url(served)}/models", timeout=10)
    assert raw.value.code == 401
    assert "missing 'authorization' header" in json.loads(raw.value.read())["error"]["message"]
    _counted(served, "UNAUTHENTICATED", before + 2)
    health = f"http://127.0.0.1:{served.cfg.http_port}/health"
    assert urllib.request.urlopen(health, timeout=10).status == 200


def _idle(dep: Deployment) -> bool:
    running = sum(metric_values(dep, "pdserve:num_requests_running").values())
    waiting = sum(metric_values(dep, "pdserve:num_requests_waiting").values())
    return running == 0 and waiting == 0 and all_blocks_free(dep)


def test_client_disconnect_aborts_the_request(client: openai.OpenAI, model: str,
                                              served: Deployment) -> None:
    before = failure_counts(served).get("CANCELLED", 0)
    stream = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=2000, temperature=0,  # type: ignore[arg-type]
        stream=True, extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got >= 3:
            break
    assert not _idle(served)  # it still runs: the close below is what ends it
    stream.close()
    wait_for(lambda: _idle(served), what="the streamed request aborted, its blocks free")
    # A request that does not stream: the client gives up (its read timeout) mid-way.
    with openai.OpenAI(base_url=_base_url(served), api_key=TOKEN, max_retries=0,
                       timeout=2.0) as impatient, pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=model, prompt=PROMPT, max_tokens=2000,
                                     extra_body={"ignore_eos": True})
    wait_for(lambda: _idle(served), what="the whole request aborted, its blocks free")
    _counted(served, "CANCELLED", before + 2)


def test_connections_spread_over_both_frontends(served: Deployment, model: str) -> None:
    """Both frontends listen on the HTTP port (SO_REUSEPORT); the kernel picks one per
    connection by a hash, so keep connecting until both have served (the chance that 64
    connections all hash alike is 2**-63)."""
    start = ray.get([f.num_served.remote() for f in served.frontends])
    texts = set()
    for _ in range(64):
        with openai.OpenAI(base_url=_base_url(served), api_key=TOKEN, max_retries=0) as c:
            texts.add(c.completions.create(model=model, prompt=PROMPT, max_tokens=4,
                                           temperature=0).choices[0].text)
        now = ray.get([f.num_served.remote() for f in served.frontends])
        if all(n > s for n, s in zip(now, start, strict=True)):
            break
    assert all(n > s for n, s in zip(now, start, strict=True)), (start, now)
    assert len(texts) == 1 and texts != {""}


def test_deadline_header_ends_the_request_504(client: openai.OpenAI, model: str,
                                              served: Deployment) -> None:
    before = failure_counts(served).get("DEADLINE_EXCEEDED", 0)
    late = {"x-pdserve-timeout-s": "1"}
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2000,
                                  extra_body={"ignore_eos": True}, extra_headers=late)
    assert e.value.status_code == 504 and e.value.code == "deadline_exceeded"
    # Streamed, the stream has begun: the error comes as an event, raised by the client.
    stream = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=2000, stream=True,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True}, extra_headers=late)
    with pytest.raises(openai.APIError) as err:
        for _ in stream:
            pass
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "deadline_exceeded"
    _counted(served, "DEADLINE_EXCEEDED", before + 2)
    wait_for(lambda: _idle(served), what="blocks freed after the deadlines")
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=model, prompt=PROMPT,
                                  extra_headers={"x-pdserve-timeout-s": "soon"})
    assert bad.value.param == "x-pdserve-timeout-s"


def test_request_id_header_names_the_request_and_a_duplicate_is_409(
    client: openai.OpenAI, model: str, served: Deployment
) -> None:
    rid = {"x-request-id": "http-dup-1"}
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=2000,
                                       stream=True, extra_body={"ignore_eos": True},
                                       extra_headers=rid)
    first = next(iter(stream))
    assert first.id == "cmpl-http-dup-1"
    with pytest.raises(openai.ConflictError) as e:  # while the first is in flight
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2,
                                  extra_headers=rid)
    assert e.value.status_code == 409 and "http-dup-1" in e.value.message
    stream.close()
    wait_for(lambda: _idle(served), what="the first request aborted")
    again = client.completions.with_raw_response.create(model=model, prompt=PROMPT,
                                                        max_tokens=2, extra_headers=rid)
    assert again.headers["x-request-id"] == "http-dup-1"
    assert again.parse().id == "cmpl-http-dup-1"


# ------------------------------------------------------------- n, logprobs, penalties
LOGPROB_TOL = 1e-5  # the gRPC API sends float32; the HTTP API the feed's float64


@pytest.fixture(scope="module")
def grpc_client(served: Deployment) -> Iterator[Client]:
    with Client(served.address, auth=ClientAuth(tls=False, token=TOKEN)) as c:
        yield c


def _sampled(over: dict[str, object]) -> dict[str, object]:
    return {"max_tokens": 8, "temperature": 1.0, "seed": 1234,
            "extra_body": {"ignore_eos": True}, **over}


def test_n_seeded_gives_n_reproducible_choices_as_the_grpc_api_does(
    client: openai.OpenAI, model: str, grpc_client: Client, hf_reference: HFReference
) -> None:
    ids = hf_reference.tokenizer(PROMPT)["input_ids"]
    outs = [client.completions.create(model=model, prompt=PROMPT, n=2, **_sampled({}))  # type: ignore[call-overload]
            for _ in range(2)]
    texts = [[c.text for c in sorted(o.choices, key=lambda c: c.index)] for o in outs]
    assert [c.index for c in outs[0].choices] == [0, 1] and texts[1] == texts[0]
    want = collect_choices(grpc_client.generate(text=PROMPT, max_tokens=8, temperature=1.0,
                                                seed=1234, ignore_eos=True, n=2))
    assert texts[0] == [c.text for c in want] and texts[0][0] != texts[0][1]
    assert all(c.finish_reason == "length" for c in outs[0].choices)
    assert outs[0].usage is not None
    assert (outs[0].usage.prompt_tokens, outs[0].usage.completion_tokens) == (len(ids), 16)
    chats = [client.chat.completions.create(model=model, messages=CHAT, n=2,  # type: ignore[call-overload]
                                            **_sampled({})) for _ in range(2)]
    contents = [[c.message.content for c in o.choices] for o in chats]
    assert [c.index for c in chats[0].choices] == [0, 1] and contents[1] == contents[0]
    assert contents[0][0] != contents[0][1]
    assert chats[0].usage is not None and chats[0].usage.completion_tokens == 16


def test_streamed_n_gives_each_choice_whole_with_its_finish(
    client: openai.OpenAI, model: str
) -> None:
    whole = client.chat.completions.create(model=model, messages=CHAT, n=2,  # type: ignore[call-overload]
                                           **_sampled({}))
    stream = client.chat.completions.create(
        model=model, messages=CHAT, n=2, stream=True,  # type: ignore[call-overload]
        stream_options={"include_usage": True}, **_sampled({}))
    chunks = list(stream)
    text: dict[int, str] = {0: "", 1: ""}
    roles: dict[int, int] = {0: 0, 1: 0}
    finishes: dict[int, list[str]] = {0: [], 1: []}
    for c in chunks[:-1]:
        (ch,) = c.choices
        assert not finishes[ch.index], "nothing of a choice after its finish"
        roles[ch.index] += ch.delta.role == "assistant"
        text[ch.index] += ch.delta.content or ""
        if ch.finish_reason is not None:
            finishes[ch.index].append(ch.finish_reason)
    assert roles == {0: 1, 1: 1} and finishes == {0: ["length"], 1: ["length"]}
    assert [text[0], text[1]] == [c.message.content for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()  # type: ignore[union-attr]
    done = [c.choices[0].index for c in client.completions.create(
        model=model, prompt=PROMPT, n=2, stream=True, **_sampled({}))  # type: ignore[call-overload]
        if c.choices[0].finish_reason is not None]
    assert sorted(done) == [0, 1]


def _token(hf: HFReference, t: int) -> str:
    return str(hf.tokenizer.decode([t], skip_special_tokens=False))


def test_chat_logprobs_equal_the_grpc_apis(
    client: openai.OpenAI, model: str, grpc_client: Client, hf_reference: HFReference
) -> None:
    want = collect(grpc_client.generate(messages=CHAT, max_tokens=8, temperature=0.0,
                                        logprobs=True, top_logprobs=3))
    kw = {"model": model, "messages": CHAT, "max_completion_tokens": 8, "temperature": 0,
          "logprobs": True, "top_logprobs": 3}
    out = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    content = out.choices[0].logprobs.content
    assert content is not None and len(content) == len(want.token_ids) == 8
    for got, t, lp in zip(content, want.token_ids, want.logprobs, strict=True):
        assert got.token == _token(hf_reference, t) and got.bytes == list(got.token.encode())
        assert got.logprob == pytest.approx(lp.logprob, abs=LOGPROB_TOL)
        assert [a.token for a in got.top_logprobs] == [_token(hf_reference, a.token_id)
                                                       for a in lp.top]
        assert [a.logprob for a in got.top_logprobs] == pytest.approx(
            [a.logprob for a in lp.top], abs=LOGPROB_TOL)
    streamed = [e for c in client.chat.completions.create(**kw, stream=True)  # type: ignore[call-overload]
                if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content or ()]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]


def test_completion_logprobs_equal_the_grpc_apis(
    client: openai.OpenAI, model: str, grpc_client: Client, hf_reference: HFReference
) -> None:
    want = collect(grpc_client.generate(text=PROMPT, max_tokens=8, temperature=0.0,
                                        logprobs=True, top_logprobs=3))
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                    logprobs=3)
    lps = out.choices[0].logprobs
    assert lps is not None and lps.tokens is not None and lps.top_logprobs is not None
    assert lps.tokens == [_token(hf_reference, t) for t in want.token_ids]
    assert lps.token_logprobs == pytest.approx([lp.logprob for lp in want.logprobs],
                                               abs=LOGPROB_TOL)
    for top, lp in zip(lps.top_logprobs, want.logprobs, strict=True):
        # greedy: the sampled token is the best, so the dict holds the 3 alternatives
        assert list(top) == [_token(hf_reference, a.token_id) for a in lp.top]
        assert list(top.values()) == pytest.approx([a.logprob for a in lp.top],
                                                   abs=LOGPROB_TOL)
    starts = [sum(len(t) for t in lps.tokens[:i]) for i in range(len(lps.tokens))]
    assert lps.text_offset == starts
    streamed: list[str] = []
    for c in client.completions.create(model=model, prompt=PROMPT, max_tokens=8,
                                       temperature=0, logprobs=3, stream=True):
        if c.choices[0].logprobs is not None:
            assert c.choices[0].logprobs.text_offset == starts[len(streamed):][
                :len(c.choices[0].logprobs.tokens or ())]
            streamed += c.choices[0].logprobs.tokens or ()
    assert streamed == lps.tokens


def _greedy_text(client: openai.OpenAI, model: str, ids: list[int], max_tokens: int,
                 **extra: object) -> tuple[str, int]:
    out = client.completions.create(model=model, prompt=ids, max_tokens=max_tokens,
                                    temperature=0, extra_body=extra)
    assert out.usage is not None
    return out.choices[0].text, out.usage.completion_tokens


def _ref(hf: HFReference, out: list[int]) -> tuple[str, int]:
    eos = bool(out) and out[-1] == hf.eos
    return hf.tokenizer.decode(out[:-1] if eos else out, skip_special_tokens=True), len(out)


def test_penalties_and_min_tokens_equal_transformers(
    client: openai.OpenAI, model: str, hf_reference: HFReference
) -> None:
    hf, n = hf_reference, 16
    ids = hf.tokenizer("List three colors: red, green, and blue. List three more colors: "
                       "red, green,")["input_ids"]
    want = hf.generate(ids, n, repetition_penalty=1.3)
    assert want != hf.greedy(ids, n)  # the penalty changes something
    assert _greedy_text(client, model, ids, n, repetition_penalty=1.3) == _ref(hf, want)
    want = hf.generate(ids, n, logits_processor=openai_penalties(len(ids), 0.8, 0.6))
    out = client.completions.create(model=model, prompt=ids, max_tokens=n, temperature=0,
                                    presence_penalty=0.8, frequency_penalty=0.6)
    assert out.choices[0].text == _ref(hf, want)[0]
    chat = hf.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}],
                                            add_generation_prompt=True, tokenize=False)
    ids = hf.tokenizer(chat, add_special_tokens=False)["input_ids"]
    plain = hf.greedy(ids, 40)
    assert plain[-1] == hf.eos, "the prompt must end at EOS for this test"
    floor = len(plain) + 4
    want = hf.generate(ids, floor + 8, min_new_tokens=floor)
    got = _greedy_text(client, model, ids, floor + 8, min_tokens=floor)
    assert got == _ref(hf, want) and got[1] >= floor
