"""The OpenAI request bodies pdserve accepts, as pydantic models.

The models check types only (a string where a number belongs is a 400 naming the field);
ranges and limits are checked by ``router.validation``, the code the gRPC API runs, once
``convert`` has turned a request into a ``GenerateRequest``. Fields pdserve does not know are
accepted and ignored, as OpenAI and vLLM do (``extra="allow"``). The completion fields
pdserve does not serve (``echo``, ``suffix``, ``best_of``) are declared, so that their types
are checked, and refused by ``convert.UNSUPPORTED`` unless neutral.

Extensions beyond OpenAI's API (vLLM's names where vLLM has the field): ``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``,
``slo_class``, ``slo_ttft_ms`` and ``slo_tpot_ms``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(_Body):
    """One part of a message's content; pdserve reads ``text`` parts."""

    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class _Generation(_Body):
    """The fields chat and completion requests share."""

    model: str | None = None  # None: the served model (as vLLM takes it)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # pdserve's extensions
    top_k: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    slo_class: str | None = None
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    min_p: float | None = None


class CompletionRequest(_Generation):
    """``POST /v1/completions``: one prompt, as text or token ids (a list of one of either
    is taken as that one prompt)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None  # how many alternatives per token (0: the token's own)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatCompletionRequest(_Generation):
    """``POST /v1/chat/completions``: a conversation for the model's chat template."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
