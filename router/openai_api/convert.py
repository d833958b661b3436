"""OpenAI requests to the ``GenerateRequest`` the gRPC API takes, so that an HTTP request is
validated by the same code (``router.validation``, through ``Frontend.submission``), and
that code's errors back to OpenAI's field names.

What ``convert`` itself refuses is what the wire message cannot hold (a negative token id,
a seed past 64 bits), several prompts in one request, and the fields pdserve does not serve
(``UNSUPPORTED``), each a 400 naming the field.

Logprobs: chat asks with ``logprobs`` (a bool) and ``top_logprobs`` (how many alternatives);
a completion with ``logprobs`` alone, the number of alternatives (0 to 20, as vLLM takes
it). Both become the wire's ``logprobs`` and ``top_logprobs``.
"""

from __future__ import annotations

import re

from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.openai_api.errors import ApiError
from pdserve.router.openai_api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ContentPart,
    _Generation,
)
from pdserve.router.validation import RequestError

# Completion fields outside pdserve's generation model, by name, with the values that mean
# "off" (accepted: clients such as LangChain send them).
UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "echo": (False,),
    "suffix": ("",),
    "best_of": (1,),
}

SLO_CLASS_HEADER = "x-pdserve-slo-class"
REQUEST_ID_HEADER = "x-request-id"
UINT32 = 2**32
INT32 = 2**31
UINT64 = 2**64


def _is_neutral(value: object, neutral: tuple[object, ...]) -> bool:
    # type() as well as ==: False == 0, but a logprobs of 0 asks for something.
    return value is None or any(type(value) is type(n) and value == n for n in neutral)


def check_supported(req: _Generation) -> None:
    """400 naming the first field that asks for something pdserve does not do."""
    for name, neutral in UNSUPPORTED.items():
        value = getattr(req, name, None)
        if not _is_neutral(value, neutral):
            raise ApiError("INVALID_ARGUMENT", f"{name} is not supported (got {value!r})", name)


def check_model(model: str | None, served: str) -> None:
    """``model`` must name the served model (None: it does, as vLLM takes it)."""
    if model is not None and model != served:
        raise ApiError("NOT_FOUND", f"The model `{model[:200]}` does not exist (this server "
                       f"serves `{served}`)", "model")


def _uint(value: int, param: str, bound: int, minimum: int = 0) -> int:
    """``value`` if the wire field holds it, else a 400 (the range checks proper are
    ``router.validation``'s)."""
    if not minimum <= value < bound:
        raise ApiError("INVALID_ARGUMENT",
                       f"{param} must be in [{minimum}, {bound - 1}], got {value}", param)
    return value


def _sampling(req: _Generation, max_tokens: int | None, max_tokens_param: str
              ) -> pb.SamplingParams:
    s = pb.SamplingParams()
    if max_tokens is not None:
        # 0 passes to validation, which says what the minimum is.
        s.max_tokens = _uint(max_tokens, max_tokens_param, UINT32)
    if req.temperature is not None:
        s.temperature = req.temperature
    if req.top_p is not None:
        s.top_p = req.top_p
    if req.top_k is not None:
        s.top_k = _uint(req.top_k, "top_k", INT32, -INT32)
    if req.seed is not None:
        s.seed = _uint(req.seed, "seed", UINT64)
    if req.stop is not None:
        s.stop.extend([req.stop] if isinstance(req.stop, str) else req.stop)
    for i, t in enumerate(req.stop_token_ids or ()):
        s.stop_token_ids.append(_uint(t, f"stop_token_ids[{i}]", UINT32))
    s.ignore_eos = req.ignore_eos
    if req.n is not None:
        s.n = _uint(req.n, "n", UINT32)  # 0 passes to validation, which gives the range
    if req.repetition_penalty is not None:
        s.repetition_penalty = req.repetition_penalty
    if req.presence_penalty is not None:
        s.presence_penalty = req.presence_penalty
    if req.frequency_penalty is not None:
        s.frequency_penalty = req.frequency_penalty
    if req.min_p is not None:
        s.min_p = req.min_p
    if req.min_tokens is not None:
        s.min_tokens = _uint(req.min_tokens, "min_tokens", UINT32)
    return s


def _chat_logprobs(req: ChatCompletionRequest, s: pb.SamplingParams) -> None:
    s.logprobs = bool(req.logprobs)
    if req.top_logprobs is not None:
        s.top_logprobs = _uint(req.top_logprobs, "top_logprobs", UINT32)


def _completion_logprobs(req: CompletionRequest, s: pb.SamplingParams) -> None:
    if req.logprobs is not None:
        s.logprobs = True
        s.top_logprobs = _uint(req.logprobs, "logprobs", UINT32)


def _slo(req: _Generation, header_class: str | None) -> pb.Slo:
    cls = req.slo_class
    if header_class is not None and cls is not None and header_class != cls:
        raise ApiError("INVALID_ARGUMENT", f"slo_class {cls[:64]!r} and the "
                       f"{SLO_CLASS_HEADER} header {header_class[:64]!r} disagree",
                       "slo_class")
    return pb.Slo(class_name=cls if cls is not None else header_class or "",
                  ttft_ms=req.slo_ttft_ms or 0.0, tpot_ms=req.slo_tpot_ms or 0.0)


def _common(req: _Generation, request_id: str, header_class: str | None,
            max_tokens: int | None, max_tokens_param: str) -> pb.GenerateRequest:
    check_supported(req)
    if req.stream_options is not None and not req.stream:
        raise ApiError("INVALID_ARGUMENT", "stream_options is only allowed when stream is "
                       "true", "stream_options")
    return pb.GenerateRequest(request_id=request_id,
                              sampling=_sampling(req, max_tokens, max_tokens_param),
                              slo=_slo(req, header_class))


def completion_request(req: CompletionRequest, request_id: str = "",
                       header_class: str | None = None) -> pb.GenerateRequest:
    out = _common(req, request_id, header_class, req.max_tokens, "max_tokens")
    _completion_logprobs(req, out.sampling)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) > 1:
            raise ApiError("INVALID_ARGUMENT", f"prompt: a batch of {len(prompt)} prompts is "
                           "not supported; send one request per prompt", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        out.text = prompt
    else:
        ids = [_uint(t, f"prompt[{i}]", UINT32) for i, t in enumerate(prompt)]  # type: ignore[arg-type]
        out.token_ids.ids.extend(ids)
        if not ids:  # an empty oneof member is still the one set
            out.token_ids.SetInParent()
    return out


def chat_request(req: ChatCompletionRequest, request_id: str = "",
                 header_class: str | None = None) -> pb.GenerateRequest:
    # OpenAI: max_completion_tokens replaces the deprecated max_tokens.
    max_tokens: int | None = req.max_tokens
    param = "max_tokens"
    if req.max_completion_tokens is not None:
        max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
    out = _common(req, request_id, header_class, max_tokens, param)
    _chat_logprobs(req, out.sampling)
    out.messages.SetInParent()
    for i, m in enumerate(req.messages):
        out.messages.messages.append(pb.ChatMessage(role=m.role, content=_text(m.content, i)))
    return out


def _text(content: str | list[ContentPart] | None, i: int) -> str:
    """A message's content as text: a string, or its text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            param = f"messages[{i}].content[{j}]"
            raise ApiError("INVALID_ARGUMENT", f"{param}: only text parts are supported, "
                           f"got type {part.type[:32]!r}", f"{param}.type")
        texts.append(part.text)
    return "".join(texts)


# router.validation's field names (the GenerateRequest's) -> the OpenAI request's.
_FIELDS = (
    (re.compile(r"sampling\.max_tokens"), "{max_tokens}"),
    (re.compile(r"sampling\.top_logprobs"), "{top_logprobs}"),
    (re.compile(r"sampling\.(\w+)"), r"\1"),
    (re.compile(r"token_ids\.ids"), "prompt"),
    (re.compile(r"messages\.messages"), "messages"),
    (re.compile(r"slo\.class_name"), "slo_class"),
    (re.compile(r"slo\.(ttft_ms|tpot_ms)"), r"slo_\1"),
    (re.compile(r"^text$"), "prompt"),
    (re.compile(r"^input$"), "{input}"),
    (re.compile(r"^request_id$"), REQUEST_ID_HEADER),
)


def api_error(e: RequestError, chat: bool, max_tokens_param: str = "max_tokens") -> ApiError:
    """``e`` (from ``router.validation``) with the OpenAI request's field names, in the
    param and in the message: ``sampling.top_p must be in (0, 1]`` is ``top_p must be in
    (0, 1]``, param ``top_p``."""
    names = {"max_tokens": max_tokens_param, "input": "messages" if chat else "prompt",
             "top_logprobs": "top_logprobs" if chat else "logprobs"}
    param, message = e.field, e.message
    for pattern, repl in _FIELDS:
        new = pattern.sub(repl, param).format(**names)
        if new != param:
            if param not in ("text", "input"):  # the field's name in the message too
                message = message.replace(re.sub(r"\[\d+\]$", "", param),
                                          re.sub(r"\[\d+\]$", "", new))
            else:
                message = re.sub(rf"^{param}\b", new, message)
            param = new
            break
    # Other fields the message names ("min_tokens=9 exceeds sampling.max_tokens=4").
    message = re.sub(r"sampling\.max_tokens\b", names["max_tokens"], message)
    message = re.sub(r"sampling\.(\w+)", r"\1", message)
    # "stop_token_ids[2] = 99999 is out of vocabulary": the param names the element too.
    if (m := re.match(rf"{re.escape(param)}\[\d+\]", message)) is not None:
        param = m.group(0)
    return ApiError(e.code.name, message, param)
