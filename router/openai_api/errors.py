"""Errors of the HTTP API in OpenAI's shape, from pdserve's gRPC status codes.

Every failure, wherever it arises (a body of the wrong type, ``router.validation``, the
token check, the router's admission, a stream that ends in an error), is an ``ApiError``
carrying the gRPC status name the gRPC API would end the call with; ``STATUS`` is the one
table from that name to the HTTP status and OpenAI's error ``type`` and ``code``. The
body is ``{"error": {"message", "type", "param", "code"}}``, which the official ``openai``
client turns into ``BadRequestError``, ``AuthenticationError``, ``NotFoundError``,
``RateLimitError``, ... by the HTTP status.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HttpStatus:
    status: int
    type: str  # OpenAI's error type
    code: str  # OpenAI's error code
    retry: bool | None = None  # x-should-retry for the openai client; None: its own rule


STATUS: dict[str, HttpStatus] = {
    "INVALID_ARGUMENT": HttpStatus(400, "invalid_request_error", "invalid_argument"),
    "OUT_OF_RANGE": HttpStatus(400, "invalid_request_error", "out_of_range"),
    "FAILED_PRECONDITION": HttpStatus(400, "invalid_request_error", "failed_precondition"),
    "UNAUTHENTICATED": HttpStatus(401, "authentication_error", "invalid_api_key"),
    "PERMISSION_DENIED": HttpStatus(403, "permission_error", "permission_denied"),
    "NOT_FOUND": HttpStatus(404, "invalid_request_error", "model_not_found"),
    # The same request id is in flight: a retry would meet it again.
    "ALREADY_EXISTS": HttpStatus(409, "invalid_request_error", "already_exists", retry=False),
    # Admission control (the predicted TTFT misses the objective, or the queue is full).
    "RESOURCE_EXHAUSTED": HttpStatus(429, "rate_limit_error", "rate_limit_exceeded"),
    "CANCELLED": HttpStatus(499, "cancelled", "cancelled", retry=False),
    "UNIMPLEMENTED": HttpStatus(501, "invalid_request_error", "unimplemented", retry=False),
    "UNAVAILABLE": HttpStatus(503, "service_unavailable", "unavailable"),
    # The request's own deadline (x-pdserve-timeout-s) passed: a retry gets the same one.
    "DEADLINE_EXCEEDED": HttpStatus(504, "timeout_error", "deadline_exceeded", retry=False),
}
INTERNAL = HttpStatus(500, "internal_error", "internal")  # any other status


def http_status(code: str) -> HttpStatus:
    return STATUS.get(code, INTERNAL)


class ApiError(Exception):
    """A request the HTTP API refuses or a stream that failed: the gRPC status name, the
    message, and the request field at fault (OpenAI's ``param``) when there is one."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    @property
    def status(self) -> HttpStatus:
        return http_status(self.code)

    def body(self) -> dict[str, Any]:
        s = self.status
        return {"error": {"message": self.message, "type": s.type, "param": self.param,
                          "code": s.code}}

    def headers(self) -> dict[str, str]:
        retry = self.status.retry
        return {} if retry is None else {"x-should-retry": "true" if retry else "false"}


# Type tags pydantic puts into an error's location for a union's alternatives.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def param_of(loc: Sequence[int | str]) -> str | None:
    """OpenAI's ``param`` for a pydantic error location: ('body', 'messages', 0, 'role')
    is ``messages[0].role``; a union's type tags and what follows them are dropped."""
    parts = list(loc[1:]) if loc and loc[0] == "body" else list(loc)
    out = ""
    for p in parts:
        if isinstance(p, int):
            if not out:
                break
            out += f"[{p}]"
        elif p.isidentifier() and p not in _TYPE_TAGS:
            out += f".{p}" if out else p
        else:
            break
    return out or None


def validation_error(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """An ``ApiError`` for FastAPI's ``RequestValidationError.errors()``: the first error,
    naming its field."""
    if not errors:
        return ApiError("INVALID_ARGUMENT", "the request body is invalid")
    first = errors[0]
    if first.get("type") == "json_invalid":
        why = first.get("ctx", {}).get("error", "")
        return ApiError("INVALID_ARGUMENT", f"the request body is not valid JSON: {why}")
    param = param_of(first.get("loc", ()))
    if param is None:
        return ApiError("INVALID_ARGUMENT",
                        f"the request body must be a JSON object: {first.get('msg', '')}")
    if first.get("type") == "missing":
        return ApiError("INVALID_ARGUMENT", f"{param} is required", param)
    shown = json.dumps(first.get("input"), default=str)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ApiError("INVALID_ARGUMENT", f"{param}: {first.get('msg', 'invalid')}, got {shown}",
                    param)
