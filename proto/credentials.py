"""How a client reaches a server that asks for TLS, a client certificate or a bearer token.

    auth = ClientAuth(ca="ca.pem", token="s3cret")            # TLS + token
    auth = ClientAuth(ca="ca.pem", cert="me.pem", key="me.key")  # mutual TLS
    with Client("pdserve.example:50051", auth=auth) as client: ...

The token rides in every call's metadata as ``authorization: Bearer <token>``. gRPC's own
call credentials refuse to travel over a plaintext channel, and a server may ask for a token
without TLS (on a loopback or a private network), so a client interceptor adds it instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

TOKEN_ENV = "PDSERVE_AUTH_TOKEN"


@dataclass(frozen=True)
class ClientAuth:
    """TLS (``ca``: the PEM bundle to trust, "" for the system's roots; ``tls``: off for a
    plaintext channel), a client certificate (``cert`` + ``key``: mutual TLS) and a bearer
    ``token``; each optional."""

    tls: bool = True
    ca: str = ""
    cert: str = ""
    key: str = ""
    token: str = field(default="", repr=False)
    # The name the server's certificate must carry, where it is not the target's host.
    server_name: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate needs both cert and key")
        if not self.tls and (self.ca or self.cert or self.server_name):
            raise ValueError("ca, cert, key and server_name need tls")

    @classmethod
    def from_files(cls, *, tls: bool = False, ca: str = "", cert: str = "", key: str = "",
                   token_file: str = "", server_name: str = "") -> ClientAuth | None:
        """The CLI's reading: TLS when ``tls`` or any of its files is given; the token from
        ``token_file``, else ``PDSERVE_AUTH_TOKEN``; None when nothing applies."""
        token = Path(token_file).read_text().strip() if token_file \
            else os.environ.get(TOKEN_ENV, "").strip()
        tls = tls or bool(ca or cert or server_name)
        if not tls and not token:
            return None
        return cls(tls=tls, ca=ca, cert=cert, key=key, token=token, server_name=server_name)

    def _credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))

    def _options(self, options: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
        out = list(options or ())
        if self.server_name:
            out.append(("grpc.ssl_target_name_override", self.server_name))
        return out

    def channel(self, target: str,
                options: Sequence[tuple[str, Any]] | None = None) -> grpc.Channel:
        opts = self._options(options)
        ch = (grpc.secure_channel(target, self._credentials(), options=opts) if self.tls
              else grpc.insecure_channel(target, options=opts))
        if self.token:
            ch = grpc.intercept_channel(ch, _SyncToken(self.token))
        return ch

    def aio_channel(self, target: str,
                    options: Sequence[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
        opts = self._options(options)
        interceptors: list[Any] = [_AsyncUnary(self.token), _AsyncStream(self.token)] \
            if self.token else []
        if self.tls:
            return grpc.aio.secure_channel(target, self._credentials(), options=opts,
                                           interceptors=interceptors)
        return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)


def _with_token(details: Any, token: str) -> Any:
    """``details`` with the token in its metadata (the details type is gRPC's namedtuple)."""
    pairs = [*(details.metadata or ()), ("authorization", f"Bearer {token}")]
    metadata = grpc.aio.Metadata(*pairs) if isinstance(details.metadata, grpc.aio.Metadata) \
        else pairs
    return details._replace(metadata=metadata)


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any,
                              request: Any) -> Any:
        return continuation(_with_token(details, self.token), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any,
                               request: Any) -> Any:
        return continuation(_with_token(details, self.token), request)


class _AsyncUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any,
                                    request: Any) -> Any:
        return await continuation(_with_token(details, self.token), request)


class _AsyncStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any,
                                     request: Any) -> Any:
        return await continuation(_with_token(details, self.token), request)
