"""The OpenAI-compatible HTTP API of a frontend: a FastAPI app over the frontend's
validation, tokenizer and router feed (``calls.Host``).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` (and
``/v1/models/{id}``), and ``GET /health`` (200 once the deployment serves, else 503). Every
route but ``/health`` asks for the deployment's bearer token when it has one (``TokenGate``,
the check the gRPC API makes). A request's failures are counted in the router's
``request_failure_total`` by gRPC status, as the gRPC API's are: the frontend reports what
it refuses before submitting (``count_failure``), the router counts the rest.

Headers a request may carry: ``x-request-id`` (the request id, as the gRPC field; echoed
back), ``x-pdserve-slo-class`` (its SLO class, where the body names none) and
``x-pdserve-timeout-s`` (a deadline in seconds: the router ends it DEADLINE_EXCEEDED, 504).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from pdserve.router.openai_api.calls import Call, ClientGone, Host, until_disconnected
from pdserve.router.openai_api.convert import (
    REQUEST_ID_HEADER,
    SLO_CLASS_HEADER,
    api_error,
    chat_request,
    check_model,
    completion_request,
)
from pdserve.router.openai_api.errors import ApiError, validation_error
from pdserve.router.openai_api.logprobs import Logprobs, TokenStrings
from pdserve.router.openai_api.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.router.openai_api.responses import Choice, Head, model, models, whole
from pdserve.router.openai_api.streaming import EventStream, events
from pdserve.router.security import TokenCheck
from pdserve.router.stream import Submission
from pdserve.router.validation import RequestError

TIMEOUT_HEADER = "x-pdserve-timeout-s"
OPEN_PATHS = ("/health",)  # no token asked (probes, load balancers)
CLIENT_GONE = 499  # the status of a response nobody reads (nginx's)


class TokenGate:
    """ASGI middleware: every request but ``OPEN_PATHS`` must carry the bearer token, else
    401 in OpenAI's shape before its body is read; ``refused`` hears of each."""

    def __init__(self, app: ASGIApp, check: TokenCheck, refused: Callable[[], None]) -> None:
        self.app = app
        self.check = check
        self.refused = refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            why = self.check.refusal(Headers(scope=scope).get("authorization"))
            if why is not None:
                self.refused()
                err = ApiError("UNAUTHENTICATED", why.replace("metadata", "header"))
                await _error_response(err, {"www-authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error_response(e: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(e.body(), e.status.status, headers={**e.headers(), **(headers or {})})


def _timeout(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ApiError("INVALID_ARGUMENT", f"the {TIMEOUT_HEADER} header must be a number of "
                       f"seconds > 0, got {value[:32]!r}", TIMEOUT_HEADER)
    return seconds


class Api:
    """The routes' bodies, over one frontend."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.created = int(time.time())

    @property
    def served(self) -> str:
        cfg = self.host.cfg
        return cfg.served_model_name or cfg.model_config.name

    def count(self, code: str) -> None:
        self.host.router.count_failure.remote(code)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self.generate(body, request)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self.generate(body, request)

    async def generate(self, body: ChatCompletionRequest | CompletionRequest,
                       request: Request) -> Response:
        arrival = time.monotonic()
        host, chat = self.host, isinstance(body, ChatCompletionRequest)
        try:
            call = Call(host, self.submission(body, request, arrival))
        except ApiError as e:
            self.count(e.code)
            raise
        await call.open()  # a refusal is counted by the router
        rid = call.request_id
        head = Head(("chatcmpl-" if chat else "cmpl-") + rid, int(time.time()), self.served,
                    chat)
        headers = {REQUEST_ID_HEADER: rid}
        logprobs = self.logprobs(body, chat)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return EventStream(events(call, head, usage, logprobs), call.close, headers)
        try:
            collected = await until_disconnected(request.receive, call.collect())
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
        finally:
            call.close()
        choices = []
        for c in collected:
            assert c.end is not None
            lp = None if logprobs is None else logprobs.of(c.index, c.token_ids, c.logprobs)
            choices.append(Choice(c.index, c.text, c.end, lp))
        return JSONResponse(whole(head, choices), headers=headers)

    def logprobs(self, body: ChatCompletionRequest | CompletionRequest, chat: bool
                 ) -> Logprobs | None:
        """The formatter of the tokens' logprobs, if the request asks for them."""
        if not (bool(body.logprobs) if chat else body.logprobs is not None):
            return None
        tok = self.host.tokenizer
        assert tok is not None  # submission refused the request otherwise
        return Logprobs(TokenStrings(lambda t: tok.decode([t], skip_special_tokens=False)),
                        chat)

    def submission(self, body: ChatCompletionRequest | CompletionRequest, request: Request,
                   arrival: float) -> Submission:
        """Convert, validate and tokenize (``Frontend.submission``); ApiError naming the
        request's field."""
        host = self.host
        check_model(body.model, self.served)
        rid = request.headers.get(REQUEST_ID_HEADER, "")
        slo_class = request.headers.get(SLO_CLASS_HEADER)
        timeout = _timeout(request.headers.get(TIMEOUT_HEADER))
        if isinstance(body, ChatCompletionRequest):
            req, chat = chat_request(body, rid, slo_class), True
            max_tokens = ("max_completion_tokens" if body.max_completion_tokens is not None
                          else "max_tokens")
        else:
            req, chat, max_tokens = completion_request(body, rid, slo_class), False, "max_tokens"
        if host.tokenizer is None:
            raise ApiError("UNAVAILABLE", "the server is starting")
        try:
            return host.submission(req, arrival, timeout)
        except RequestError as e:
            raise api_error(e, chat, max_tokens) from None
        except ValueError as e:  # a chat request to a model without a chat template
            raise ApiError("INVALID_ARGUMENT", f"messages: {e}", "messages") from None

    async def list_models(self) -> Response:
        return JSONResponse(models(self.served, self.created, self.host.cfg.limits.max_context))

    async def get_model(self, model_id: str) -> Response:
        check_model(model_id, self.served)
        return JSONResponse(model(self.served, self.created, self.host.cfg.limits.max_context))

    async def health(self) -> Response:
        return Response(status_code=200 if self.host.serving else 503)

    # -- errors -----------------------------------------------------------------------------
    async def on_api_error(self, request: Request, e: Exception) -> Response:
        assert isinstance(e, ApiError)
        return _error_response(e)

    async def on_invalid_body(self, request: Request, e: Exception) -> Response:
        assert isinstance(e, RequestValidationError)
        err = validation_error(e.errors())
        self.count(err.code)
        return _error_response(err)

    async def on_http_error(self, request: Request, e: Exception) -> Response:
        """Starlette's own (no such route, wrong method) in OpenAI's shape."""
        assert isinstance(e, HTTPException)
        body = {"error": {"message": str(e.detail), "type": "invalid_request_error",
                          "param": None, "code": str(e.status_code)}}
        return JSONResponse(body, e.status_code, headers=e.headers)

    async def on_internal_error(self, request: Request, e: Exception) -> Response:
        self.count("INTERNAL")
        return _error_response(ApiError("INTERNAL", f"internal error: {type(e).__name__}"))


def build_app(host: Host) -> FastAPI:
    """The app of ``host``'s HTTP API."""
    api = Api(host)
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/models", api.list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", api.get_model, methods=["GET"])
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_exception_handler(ApiError, api.on_api_error)
    app.add_exception_handler(RequestValidationError, api.on_invalid_body)
    app.add_exception_handler(HTTPException, api.on_http_error)
    app.add_exception_handler(Exception, api.on_internal_error)
    auth = host.cfg.auth
    if auth is not None:
        app.add_middleware(TokenGate, check=auth, refused=lambda: api.count("UNAUTHENTICATED"))
    return app
