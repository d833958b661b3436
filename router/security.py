"""What the frontends check before a call reaches the router: TLS (optionally mutual) on the
listening port, and a bearer token in the call's metadata.

A frontend gets the paths of its TLS files (it runs on the driver's node, where they were
checked: ``cluster.security_config``) and a SHA-256 digest of the token, never the token
itself: the digest is all a check needs, and it is what travels through Ray. A call carries
``authorization: Bearer <token>`` (what ``grpc.access_token_call_credentials`` and every
OpenAI client send); without it, or with another token, the call ends UNAUTHENTICATED before
it is parsed any further. The health service is exempt, so that load balancers and
Kubernetes probes need no secret (vLLM leaves ``/health`` open beside ``--api-key`` too).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

# Methods callable without the token: the health service (probes, load balancers).
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
SCHEME = "bearer "  # compared case-insensitively, as RFC 6750 allows


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class TokenCheck:
    """The bearer token a call must present, as its SHA-256 digest."""

    digest: bytes = field(repr=False)

    @classmethod
    def for_token(cls, token: str) -> TokenCheck:
        if not token:
            raise ValueError("an auth token must not be empty")
        return cls(token_digest(token))

    def refusal(self, authorization: str | None) -> str | None:
        """None if ``authorization`` (the header's value) carries the token, else why not."""
        if authorization is None:
            return "missing 'authorization' metadata: send 'authorization: Bearer <token>'"
        if authorization[:len(SCHEME)].lower() != SCHEME:
            return "the 'authorization' metadata must read 'Bearer <token>'"
        given = token_digest(authorization[len(SCHEME):].strip())
        if not hmac.compare_digest(given, self.digest):
            return "invalid bearer token"
        return None


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the frontends' TLS: certificate chain and key, and the CA bundle that
    client certificates must chain to (mutual TLS) when ``client_ca`` is set."""

    cert: str
    key: str
    client_ca: str = ""

    def server_credentials(self) -> grpc.ServerCredentials:
        """Read the files now (a frontend calls this as it starts listening)."""
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
            root_certificates=ca, require_client_auth=ca is not None,
        )


def _metadata_value(metadata: Iterable[tuple[str, Any]] | None, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that ends the call UNAUTHENTICATED."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    make: Any = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Ends every call without the token UNAUTHENTICATED (``OPEN_PREFIXES`` excepted);
    ``refused`` hears of each such call (the router counts it as a failure)."""

    def __init__(self, check: TokenCheck, refused: Callable[[], None]) -> None:
        self.check = check
        self.refused = refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        why = self.check.refusal(_metadata_value(
            details.invocation_metadata, "authorization"))
        if why is None:
            return handler
        self.refused()
        return _denied(handler, why)
